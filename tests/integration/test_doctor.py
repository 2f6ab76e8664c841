"""`dynamo-vllm doctor` on a broken instance: each check on its own line, a port really
taken, an etcd that does not answer, a CRIU that is not there, an engine that cannot be
imported; exit 1 naming what fails. (A good install, the engine imported as the service
user, is the container tier's: tests/system/test_nspawn.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.harness import engine_config, free_port, write_config

CLI = [sys.executable, "-m", "dynamo_vllm.cli.main", "doctor"]


def test_a_broken_instance_names_what_fails(tiny_model: Path, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = write_config(tmp_path / "bad.toml", engine_config(
            tiny_model, port, metrics={"port": free_port()},
            workers={"python": "/bin/false"},
            checkpoint={"enabled": True, "criu": str(tmp_path / "no-criu"),
                        "store": str(tmp_path / "store")},
            discovery={"backend": "etcd", "etcd_endpoints": [f"http://127.0.0.1:{free_port()}"]}))
        out = subprocess.run([*CLI, str(config)], capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {line.split()[1]: line for line in out.stdout.splitlines()}
    for name in ("engine", "ports", "criu", "etcd"):
        assert lines[name].startswith("FAIL"), (name, out.stdout)
    assert f"127.0.0.1:{port} (worker 0)" in lines["ports"]
    assert "check(s) failed: criu, engine, etcd, ports" in out.stderr, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
