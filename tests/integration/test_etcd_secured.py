"""The etcd backend against a real etcd over TLS (Debian's etcd, a CA the test makes), once
requiring client certificates and once with etcd's authentication on: a supervisor with
the right access publishes its scrape target and reads the fleet's; one without a client
certificate, or with a wrong password, is refused and says why; `config check` names every
access setting that cannot work."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import httpx
from click.testing import CliRunner

from dynamo_vllm.cli.main import main
from tests.harness import SupervisorProcess, b64, free_port, prefix_end, wait_for, write_config
from tests.harness.etcd_tls import PASSWORD, SecureEtcd
from tests.integration.test_supervisor_scripted import fake_python, scripted_config

TARGETS = "/dynamo-vllm/v1/instances-scrape-targets/"


def secret(path: Path, content: str) -> Path:
    path.write_text(content + "\n")
    os.chmod(path, 0o600)
    return path


def secured_config(tmp: Path, etcd: SecureEtcd, port: int, **access: str) -> Path:
    path = scripted_config(tmp, fake_python(tmp, "exec sleep 600"), port)
    config = tomllib.loads(path.read_text())
    config["discovery"] = {"backend": "etcd", "etcd_endpoints": [etcd.url], "lease_ttl": 5,
                           "etcd_ca_file": str(etcd.certs["ca.pem"]), **access}
    return write_config(path, config)


def test_client_certificates(tmp_path: Path) -> None:
    etcd = SecureEtcd(tmp_path / "etcd", client_cert_auth=True).start()
    cert = {"etcd_cert_file": str(etcd.certs["client.pem"]),
            "etcd_key_file": str(etcd.certs["client.key"])}
    check_right_and_wrong(tmp_path, etcd, cert, {}, "etcd unreachable")


def test_etcd_authentication(tmp_path: Path) -> None:
    etcd = SecureEtcd(tmp_path / "etcd", client_cert_auth=False).start()
    etcd.enable_auth()
    right = {"etcd_user": "root", "etcd_password_file": str(secret(tmp_path / "pw", PASSWORD))}
    wrong = {"etcd_user": "root", "etcd_password_file": str(secret(tmp_path / "wrong-pw", "nope"))}
    check_right_and_wrong(tmp_path, etcd, right, wrong, "authenticating as 'root'")


def check_right_and_wrong(tmp_path: Path, etcd: SecureEtcd, right: dict[str, str],
                          wrong: dict[str, str], refusal: str) -> None:
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    good_port, bad_port = free_port(), free_port()
    good = SupervisorProcess(secured_config(good_dir, etcd, good_port, **right), good_dir,
                             good_port)
    bad = SupervisorProcess(secured_config(bad_dir, etcd, bad_port, **wrong), bad_dir, bad_port)
    try:
        def fleet(base: str) -> httpx.Response | None:
            try:
                return httpx.get(base + "/sd?scope=fleet", timeout=5)
            except httpx.HTTPError:
                return None

        groups = wait_for(lambda: (answer := fleet(good.base)) is not None and
                          answer.status_code == 200 and answer.json(), 30,
                          what="the target group read back over TLS with authentication")
        assert [g["targets"] for g in groups] == [[f"127.0.0.1:{good_port}"]], groups
        stored = etcd.call("/v3/kv/range", {"key": b64(TARGETS),
                                            "range_end": prefix_end(TARGETS)})
        assert len(stored.get("kvs", [])) == 1, stored
        refused = wait_for(lambda: (answer := fleet(bad.base)) is not None and answer, 30,
                           what="the wrong password's answer")
        assert refused.status_code == 503, refused.text
        assert refusal in refused.json()["error"], refused.json()
        assert good.proc.poll() is None and bad.proc.poll() is None
    finally:
        good.cleanup()
        bad.cleanup()
        etcd.stop()


def test_config_check_names_access_settings_that_cannot_work(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    open_password = tmp_path / "pw"
    open_password.write_text("x\n")
    open_password.chmod(0o644)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\npath = "{tmp_path}"\n[discovery]\nbackend = "etcd"\n'
                    f'etcd_cert_file = "{tmp_path}/missing.pem"\n'
                    f'etcd_password_file = "{open_password}"\n')
    result = CliRunner().invoke(main, ["config", "check", str(conf)])
    assert result.exit_code == 78, result.output
    for problem in ("discovery.etcd_cert_file: etcd_cert_file and etcd_key_file go together",
                    "discovery.etcd_user: etcd_user and etcd_password_file go together",
                    f"discovery.etcd_cert_file: cannot read {tmp_path}/missing.pem",
                    "discovery.etcd_password_file: ", "chmod 600 it"):
        assert problem in result.output, (problem, result.output)



