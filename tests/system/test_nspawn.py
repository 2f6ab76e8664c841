"""The .deb under a real systemd: a Debian 12 container booted with systemd-nspawn.

In order, on one container: install the package, add the CPU engine from a wheelhouse
(and package that engine tree as the engine .deb), start an instance on the tiny model,
scrape it from the host, kill its EngineCore, stop its supervisor (watchdog), start a bad
config, stop, restore its worker under the checkpoint drop-in (CRIU), remove (a running
instance of stand-in workers is stopped) and purge; then the "full" install (the agent and
the engine .deb with ai-dynamo, no pip) serves two workers behind Dynamo's frontend, and a
reload under load through it loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w

from tests.harness import SteadyStreams, free_port, wait_for
from tests.system.container import (
    GUEST_MODEL,
    ROOT,
    Container,
    missing_tools,
    tiny_instance_config,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn needs root"),
    # The first test also builds the .deb, the rootfs and the wheelhouse.
    pytest.mark.timeout(1500),
]

UNIT = "dynamo-vllm@tiny.service"


def _build(args: list[str], timeout: float) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def container(system_builds: dict[str, Path], deb: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    missing = missing_tools()
    assert not missing, f"missing tools (scripts/install-system-deps): {missing}"
    share = tmp_path_factory.mktemp("share")
    shutil.copy(deb, share / "dynamo-vllm.deb")
    shutil.copy(ROOT / "tests" / "system" / "vm_guest" / "fake_worker.py", share)
    shutil.copy(ROOT / "systemd" / "checkpoint.conf.example", share / "checkpoint.conf")
    # Booted so that CRIU can work under the unit, as on a host (container.CRIU_NSPAWN_ARGS).
    guest = Container(system_builds["rootfs"], share, share / "nspawn.log",
                      binds={system_builds["wheelhouse"]: "/mnt/wheelhouse",
                             ROOT / "dist": "/mnt/dist"}, for_criu=True)
    guest.boot()
    guest.metrics_port = free_port()  # type: ignore[attr-defined]
    guest.base_port = free_port()  # type: ignore[attr-defined]
    try:
        yield guest
    finally:
        journal = guest.run("journalctl --no-pager -o short-monotonic -u 'dynamo-vllm@*'",
                            check=False).stdout
        (share / "journal.txt").write_text(journal)
        guest.shutdown()


def status(guest: Container) -> dict:
    port = guest.metrics_port  # type: ignore[attr-defined]
    try:
        return dict(httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json())
    except (httpx.HTTPError, ValueError):
        return {}


def journal_entries(guest: Container, selection: str) -> list[dict]:
    """The journal's entries as JSON objects (`journalctl -o json`)."""
    out = guest.run(f"journalctl --no-pager -o json {selection}").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def agent_processes(guest: Container) -> list[str]:
    out = guest.run("pgrep -a -f 'dynamo_vllm|dynamo-vllm run|VLLM::' || true").stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_install_creates_the_user_and_starts_nothing(container: Container) -> None:
    container.run("dpkg -i /mnt/share/dynamo-vllm.deb", timeout=120)
    assert "dynamo-vllm" in container.run("id -nG dynamo-vllm").stdout
    assert container.run("stat -c '%a %U' /var/lib/dynamo-vllm").stdout.split() == \
        ["750", "dynamo-vllm"]
    assert container.run("stat -c '%a' /var/lib/dynamo-vllm/checkpoints").stdout.strip() == "700"
    assert container.run("test -f /etc/dynamo-vllm/example.toml && echo yes").stdout.strip() \
        == "yes"
    verify = container.run("systemd-analyze verify dynamo-vllm@tiny.service dynamo-vllm.target",
                           check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    exposure = container.run("systemd-analyze security --no-pager dynamo-vllm@tiny.service "
                             "| tail -1").stdout
    print("systemd-analyze security:", exposure.strip())
    assert "Overall exposure level" in exposure
    assert container.run("systemctl list-units --no-legend 'dynamo-vllm@*'").stdout.strip() == ""
    assert agent_processes(container) == []
    # The man page and bash completion the package installs.
    # (This minimal guest's dpkg skips /usr/share/man: the page is read from the package.)
    page = container.run("dpkg-deb --fsys-tarfile /mnt/share/dynamo-vllm.deb | tar -xO "
                         "./usr/share/man/man1/dynamo-vllm.1.gz | zcat").stdout
    assert ".TH DYNAMO-VLLM" in page and "checkpoints" in page and "/etc/dynamo-vllm" in page
    registered = container.run("bash -c '. /usr/share/bash-completion/completions/dynamo-vllm "
                               "&& complete -p dynamo-vllm'").stdout
    assert "dynamo-vllm" in registered, registered
    offered = container.run("_DYNAMO_VLLM_COMPLETE=bash_complete COMP_WORDS='dynamo-vllm che' "
                            "COMP_CWORD=1 dynamo-vllm").stdout
    assert "checkpoint" in offered and "checkpoints" in offered, offered


def test_engine_installs_offline_beside_the_package(container: Container) -> None:
    container.run("dynamo-vllm engine install --cpu --wheelhouse /mnt/wheelhouse", timeout=900)
    assert container.run("cat /opt/dynamo-vllm/engine/dynamo-vllm-engine.json").stdout
    # pip never touched dpkg's files (the man page this guest's dpkg skips aside).
    changed = [line for line in container.run("dpkg -V dynamo-vllm").stdout.splitlines()
               if " /usr/share/man/" not in line]
    assert changed == [], changed
    # The engine .deb for the last test: this very tree, packaged from outside (what
    # `build-engine-deb WHEELHOUSE` does on a build host, without a second pip install).
    _build([str(ROOT / "packaging" / "build-engine-deb"), "--from-tree",
            f"/proc/{container.leader}/root/opt/dynamo-vllm/engine"], 600)


def test_start_returns_after_ready(container: Container) -> None:
    base_port = container.base_port  # type: ignore[attr-defined]
    metrics_port = container.metrics_port  # type: ignore[attr-defined]
    container.run(f"dynamo-vllm tiny-model {GUEST_MODEL} && chown -R dynamo-vllm: {GUEST_MODEL}",
                  timeout=300)
    config = tiny_instance_config(base_port, metrics_port)
    container.run(f"cat > /etc/dynamo-vllm/tiny.toml <<'EOF'\n{config}\nEOF")
    # A short watchdog for the test below; operators keep the unit's 30 s.
    container.run("mkdir -p /etc/systemd/system/dynamo-vllm@tiny.service.d && printf "
                  "'[Service]\\nWatchdogSec=10\\n' > "
                  "/etc/systemd/system/dynamo-vllm@tiny.service.d/test.conf && "
                  "systemctl daemon-reload")
    # The preflight, as root: the service user's checks pass on this install...
    doctor = container.run("dynamo-vllm doctor tiny", check=False, timeout=300)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "readable by dynamo-vllm" in doctor.stdout, doctor.stdout
    # ...and a model the service user cannot read is named.
    private = tomllib.loads(config)
    private["model"]["path"] = "/root/private-model"
    private["workers"]["python"] = "/bin/false"  # and an engine that cannot be imported
    container.run("mkdir -p /root/private-model && cp -a /var/lib/dynamo-vllm/models/tiny/. "
                  "/root/private-model/ && cat > /etc/dynamo-vllm/private.toml <<'EOF'\n"
                  f"{tomli_w.dumps(private)}\nEOF")
    broken = container.run("dynamo-vllm doctor private", check=False, timeout=300)
    assert broken.returncode == 1 and "FAIL  model" in broken.stdout, broken.stdout
    assert "check(s) failed: engine, model" in broken.stderr, broken.stderr
    container.run("rm -rf /root/private-model /etc/dynamo-vllm/private.toml")
    started = time.monotonic()
    container.run(f"systemctl start {UNIT}", timeout=600)
    print(f"systemctl start returned after {time.monotonic() - started:.1f} s")
    # `start` returned: READY=1 was sent, so the instance serves already.
    now = status(container)
    assert now.get("ready") is True, now
    assert container.show(UNIT, "ActiveState") == "active"
    shown = container.run(f"systemctl status --no-pager {UNIT}", check=False).stdout
    assert 'Status: "1/1 workers serving' in shown, shown
    # A clean start logs nothing at err or above, vLLM's and EngineCore's lines included
    # (they reach journald through the agent's handler, with priorities and fields).
    assert container.run(f"journalctl --no-pager -o cat -u {UNIT} -p err").stdout.strip() \
        == "", "errors logged by a clean start"
    entries = journal_entries(container, f"-u {UNIT}")
    assert any(e.get("WORKER") == "0" and "vllm" in e.get("LOGGER", "") for e in entries), \
        "vLLM's own lines carry the worker's field"


def test_the_host_scrapes_metrics_and_gets_answers(container: Container) -> None:
    port = container.metrics_port  # type: ignore[attr-defined]
    base_port = container.base_port  # type: ignore[attr-defined]
    answer = httpx.post(f"http://127.0.0.1:{base_port}/v1/completions",
                        json={"model": "tiny", "prompt": "hello", "max_tokens": 4}, timeout=60)
    assert answer.status_code == 200, answer.text

    def scraped() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        wanted = ("dynamo_agent_workers_serving 1.0", 'vllm:generation_tokens_total{',
                  "dynamo_component_total_blocks{")
        return text if all(w in text for w in wanted) else None

    wait_for(scraped, 30, interval=1, what="node, supervisor and worker series")
    # Under steady load for over two watchdog periods (WatchdogSec=10 here), a healthy
    # instance is never restarted: the watchdog follows the engine's health, not its load.
    deadline = time.monotonic() + 25
    failures: list[str] = []

    def client() -> None:
        while time.monotonic() < deadline:
            reply = httpx.post(f"http://127.0.0.1:{base_port}/v1/completions", timeout=60,
                               json={"model": "tiny", "prompt": "hello", "max_tokens": 48,
                                     "ignore_eos": True})
            if reply.status_code != 200:
                failures.append(reply.text[:200])

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=120)
    assert failures == [], failures[:3]
    assert container.show(UNIT, "NRestarts") == "0"
    assert container.show(UNIT, "ActiveState") == "active"


PROBE = """import sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1], data=b"{}", headers={
    "Content-Type": "application/json", "X-Forwarded-For": "127.0.0.1"})
try:
    print(urllib.request.urlopen(request, timeout=30).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def test_another_local_account_cannot_change_state(container: Container) -> None:
    """The default install (no token configured): a local user on loopback, even with a
    forged X-Forwarded-For, is refused by every state-changing route; root's and the
    service user's CLI work (the token the supervisor wrote at start)."""
    container.run("id intruder >/dev/null 2>&1 || useradd --no-create-home intruder")
    container.run(f"cat > /usr/local/lib/probe.py <<'EOF'\n{PROBE}EOF")
    worker = f"http://127.0.0.1:{container.base_port}"  # type: ignore[attr-defined]
    supervisor = f"http://127.0.0.1:{container.metrics_port}"  # type: ignore[attr-defined]
    for url in (f"{worker}/engine/sleep", f"{worker}/engine/wake_up",
                f"{worker}/engine/clear_kv_blocks", f"{worker}/v1/load_lora_adapter",
                f"{worker}/v1/unload_lora_adapter", f"{supervisor}/checkpoint",
                f"{supervisor}/restore"):
        code = container.run(f"runuser -u intruder -- python3 /usr/local/lib/probe.py {url}"
                             ).stdout.strip()
        assert code == "401", (url, code)
    denied = container.run("runuser -u intruder -- dynamo-vllm sleep tiny", check=False)
    assert denied.returncode == 78 and "Permission denied" in denied.stderr, denied
    # Every command as that user: a message and an exit status, never a traceback.
    for command in ("status tiny", "endpoints tiny", "checkpoints tiny", "checkpoint tiny",
                    "restore tiny --timeout 1", "reload tiny --no-wait", "wake tiny --json",
                    "config show tiny", "config check tiny"):
        ran = container.run(f"runuser -u intruder -- dynamo-vllm {command}", check=False)
        assert "Traceback" not in ran.stdout + ran.stderr, (command, ran.stderr)
    assert status(container)["workers"][0]["state"] == "serving"
    slept = container.run("dynamo-vllm sleep tiny --level 0")
    assert "worker 0: ok: asleep" in slept.stdout, slept.stdout
    woke = container.run("runuser -u dynamo-vllm -- dynamo-vllm wake tiny")
    assert "worker 0: ok: awake" in woke.stdout, woke.stdout
    wait_for(lambda: status(container).get("ready"), 60, interval=1, what="serving again")


def test_engine_core_killed_restarts_the_worker_not_the_unit(container: Container) -> None:
    before = status(container)["workers"][0]["pid"]
    container.run("pkill -9 -f '^VLLM::EngineCor[e]'")
    wait_for(lambda: (status(container).get("workers") or [{}])[0].get("pid") not in
             (None, before) and status(container).get("ready"), 300, interval=1,
             what="worker 0 replaced and serving")
    assert container.show(UNIT, "ActiveState") == "active"
    assert container.show(UNIT, "NRestarts") == "0"
    errors = container.run(f"journalctl --no-pager -o cat -u {UNIT} -p err").stdout
    assert "engine dead" in errors.lower() or "exit 3" in errors, errors
    assert "serving tiny" not in errors  # info lines are not errors
    # One worker's events, by field: the exit code and the restart reason.
    ended = journal_entries(container, f"-u {UNIT} WORKER=0 EXIT_CODE=3")
    assert any(e.get("REASON") == "engine_dead" for e in ended), ended[-3:]
    tagged = container.run("journalctl --no-pager -o cat -t dynamo-vllm -n 200").stdout
    assert "worker 0" in tagged


def test_a_stopped_supervisor_is_restarted_by_the_watchdog(container: Container) -> None:
    main_pid = container.show(UNIT, "MainPID")
    # `kill -STOP 0` would stop the test's own process group (nsenter keeps it).
    assert main_pid.isdigit() and int(main_pid) > 1, f"no main PID: {main_pid!r}"
    container.run(f"kill -STOP {main_pid}")
    container.wait(f"test \"$(systemctl show -P NRestarts {UNIT})\" -ge 1", 90,
                   "a restart after the watchdog timeout")
    journal = container.run(f"journalctl --no-pager -o cat -u {UNIT}").stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    wait_for(lambda: status(container).get("ready"), 300, interval=1, what="serving again")
    assert container.show(UNIT, "MainPID") != main_pid
    # One supervisor, one worker, one engine: nothing of the old life is left.
    procs = agent_processes(container)
    assert sum("dynamo-vllm run" in p for p in procs) == 1, procs
    assert sum("dynamo_vllm.agent" in p for p in procs) == 1, procs
    assert sum("VLLM::EngineCore" in p for p in procs) == 1, procs


def test_the_watchdog_restarts_an_instance_whose_workers_cannot_serve(
        container: Container) -> None:
    """The design's core promise under real systemd: once an instance stays below
    min_ready past watchdog.unready_grace, the supervisor withholds WATCHDOG=1 and systemd
    restarts the unit. Stand-in workers: only the first life serves, every restart of it
    stays "loading" (an engine that cannot come back), so no engine start is needed."""
    unit = "dynamo-vllm@hang.service"
    container.run("install -m 0755 /mnt/share/fake_worker.py /usr/local/lib/fake_worker.py")
    container.run("cat > /usr/local/bin/fake-python <<'EOF'\n#!/bin/sh\n"
                  'exec /usr/bin/python3 /usr/local/lib/fake_worker.py "$@"\nEOF\n'
                  "chmod 755 /usr/local/bin/fake-python")
    config = tomllib.loads(container.run("cat /etc/dynamo-vllm/tiny.toml").stdout)
    config["workers"].update(python="/usr/local/bin/fake-python", base_port=free_port(),
                             restart_backoff=0.2)
    config["metrics"]["port"] = free_port()
    config["watchdog"] = {"unready_grace": 2.0}
    container.run(f"cat > /etc/dynamo-vllm/hang.toml <<'EOF'\n{tomli_w.dumps(config)}\nEOF")
    # In the unit's runtime directory: the service user may write it, and it lasts the
    # supervisor's life (each worker life after the first stays "loading").
    container.run("echo FAKE_WORKER_SERVE_ONCE=/run/dynamo-vllm/hang/served-once "
                  "> /etc/dynamo-vllm/hang.env")
    container.run(f"mkdir -p /etc/systemd/system/{unit}.d && printf '[Service]\\nWatchdogSec=4\\n'"
                  f" > /etc/systemd/system/{unit}.d/test.conf && systemctl daemon-reload")
    try:
        started = container.run(f"systemctl start {unit}", timeout=120, check=False)
        assert started.returncode == 0, container.run(
            f"journalctl --no-pager -o cat -u {unit} | tail -30").stdout
        assert container.show(unit, "NRestarts") == "0"
        container.run("pkill -f '[/]usr/local/lib/fake_worker.py'")  # later lives never serve
        container.wait(f"test \"$(systemctl show -P NRestarts {unit})\" -ge 1", 90,
                       "systemd's restart after the withheld watchdog")
        journal = container.run(f"journalctl --no-pager -o cat -u {unit}").stdout
        assert "Watchdog timeout" in journal, journal[-3000:]
    finally:
        container.run(f"systemctl stop {unit}; rm -rf /etc/systemd/system/{unit}.d "
                      "/etc/dynamo-vllm/hang.toml /etc/dynamo-vllm/hang.env; "
                      "systemctl daemon-reload", timeout=120, check=False)


def test_a_bad_config_fails_once_and_names_the_key(container: Container) -> None:
    container.run("printf '[model]\\npath = \"/var/lib/dynamo-vllm/models/tiny\"\\n"
                  "[workers]\\ncout = 2\\n' > /etc/dynamo-vllm/bad.toml")
    result = container.run("systemctl start dynamo-vllm@bad.service", check=False, timeout=60)
    assert result.returncode != 0
    time.sleep(8)  # RestartSec is 5: a restart loop would have begun
    assert container.show("dynamo-vllm@bad.service", "NRestarts") == "0"
    assert container.show("dynamo-vllm@bad.service", "ExecMainStatus") == "78"
    journal = container.run("journalctl --no-pager -o cat -u dynamo-vllm@bad.service").stdout
    assert "workers.cout" in journal, journal


def test_stop_is_clean(container: Container) -> None:
    cursor = container.run("journalctl --show-cursor -n 0 -q | tail -1").stdout.split(
        "cursor: ")[-1].strip()
    container.run(f"systemctl stop {UNIT}", timeout=200)
    assert container.show(UNIT, "Result") == "success"
    assert agent_processes(container) == []
    # A clean stop: nothing at err or above, and none of the agent's own warnings (vLLM's
    # output handler no longer sees a planned engine stop as a death).
    after = journal_entries(container, f"-u {UNIT} -p warning --after-cursor '{cursor}'")
    assert [e["MESSAGE"] for e in after if int(e.get("PRIORITY", 6)) <= 3] == []
    assert [e["MESSAGE"] for e in after if e.get("LOGGER", "").startswith("dynamo_vllm")] == []


def has_sys_resource() -> bool:
    """Whether this machine's root holds CAP_SYS_RESOURCE (the container inherits it)."""
    with open("/proc/self/status") as fh:
        caps = next(line for line in fh if line.startswith("CapBnd:"))
    return bool(int(caps.split()[1], 16) >> 24 & 1)


def worker_credentials(container: Container) -> dict[str, tuple[str, str, str, str]]:
    """Every process of the worker's tree (the API server, EngineCore, vLLM's Worker): its
    command, uids, effective capabilities and no_new_privs, from /proc/PID/status."""
    worker = status(container)["workers"][0]["pid"]
    pids = container.run(f"echo {worker}; pgrep -P {worker}; "
                         f"for p in $(pgrep -P {worker}); do pgrep -P $p; done").stdout.split()
    found = {}
    for pid in pids:
        fields = dict(line.split(":\t", 1) for line in container.run(
            f"cat /proc/{pid}/status").stdout.splitlines() if ":\t" in line)
        found[pid] = (fields["Name"].strip(), fields["Uid"].split()[0], fields["CapEff"].strip(),
                      fields["NoNewPrivs"].strip())
    return found


def assert_unprivileged(container: Container, when: str) -> None:
    uid = container.run("id -u dynamo-vllm").stdout.strip()
    tree = worker_credentials(container)
    assert len(tree) >= 3, (when, tree)  # the API server, EngineCore and vLLM's Worker
    for pid, (name, owner, capabilities, no_new_privs) in tree.items():
        assert (owner, int(capabilities, 16), no_new_privs) == (uid, 0, "1"), (when, pid, name)
    supervisor = container.show(UNIT, "MainPID")
    assert container.run(f"stat -c %u /proc/{supervisor}").stdout.strip() == "0"


def test_the_checkpoint_drop_in_lets_the_unit_restore_its_worker(container: Container,
                                                                 criu: Path) -> None:
    # The drop-in as shipped, under the unit's real sandbox. Only the supervisor is root:
    # the worker's processes run as dynamo-vllm with no capabilities and no_new_privs,
    # restored and cold. The first start takes a checkpoint and restores from it, the next
    # start restores at once; the restored worker's output still reaches journald (its stdout
    # is a socket CRIU must hand over); a /dev/shm file another user made under a saved name
    # makes the restore refuse and the worker start cold, never map it.
    dropins = f"/etc/systemd/system/{UNIT}.d"
    config = container.run("cat /etc/dynamo-vllm/tiny.toml").stdout
    container.run(f"mkdir -p {dropins} && cp /mnt/share/checkpoint.conf {dropins}/ && "
                  "systemctl daemon-reload")
    # Under User=root systemd makes the state directory root's: the workers, as dynamo-vllm,
    # read the model through "other" permissions (safetensors writes its file 0600).
    container.run(f"chmod -R a+rX {GUEST_MODEL}")
    container.run(f"cat >> /etc/dynamo-vllm/tiny.toml <<'EOF'\n[checkpoint]\nenabled = true\n"
                  f"criu = \"{criu}\"\nEOF")
    # CRIU reads the rlimits of a worker of another uid only with CAP_SYS_RESOURCE, which a
    # host's root holds and some sandboxes' root (this CI machine's: CapEff lacks bit 24) does
    # not. There, the split's cold half is checked, and the restore half runs with the
    # workers as root (a test drop-in empties DYNAMO_VLLM_WORKER_USER), as before the split.
    split_restores = has_sys_resource()
    if not split_restores:
        container.run(f"systemctl start {UNIT}", timeout=600)
        cold = status(container)
        assert cold["workers"][0]["restored"] is False, cold
        assert "CAP_SYS_RESOURCE" in (cold["checkpoint"].get("unavailable_reason") or ""), \
            cold["checkpoint"]
        assert_unprivileged(container, "cold, the split without restores")
        container.run(f"systemctl stop {UNIT}", timeout=200)
        container.run(f"printf '[Service]\\nEnvironment=DYNAMO_VLLM_WORKER_USER=\\n' > "
                      f"{dropins}/zz-workers-as-root.conf && systemctl daemon-reload")
    try:
        started = container.run(f"systemctl start {UNIT}", timeout=600, check=False)
        assert started.returncode == 0, container.run(
            f"journalctl --no-pager -o cat -u {UNIT} | grep -i 'restor\\|checkpoint\\|criu\\|"
            "FileNotFound\\|dump\\|snapshot' | grep -v 'site-packages\\|^ *\\^' | head -40; "
            "ls -la /var/lib/dynamo-vllm/models/tiny/").stdout
        first = status(container)
        assert first["workers"][0]["restored"] is True, container.run(
            "tail -8 /etc/dynamo-vllm/tiny.toml; "
            f"journalctl --no-pager -o cat -u {UNIT} | grep 'dynamo_vllm.supervisor' "
            "| head -30").stdout
        assert first["checkpoint"]["available"] is True, first["checkpoint"]
        if split_restores:
            assert_unprivileged(container, "restored after the first checkpoint")
        container.run(f"systemctl restart {UNIT}", timeout=600)
        again = status(container)
        assert again["ready"] and again["workers"][0]["restored"] is True, (again, container.run(
            f"journalctl --no-pager -o cat -u {UNIT} | grep -i 'restor\\|checkpoint\\|criu\\|"
            "killing\\|hung\\|timeout' | grep -v 'site-packages' | tail -40").stdout)
        if split_restores:
            assert_unprivileged(container, "restored at start")
        # The restart wrote a new control token; the restored worker, whose memory predates
        # it, takes the new one (it reads the file again when it changes), not the old.
        slept = container.run("dynamo-vllm sleep tiny --level 0 --json")
        assert json.loads(slept.stdout)[0]["code"] == 200, slept.stdout
        container.run("dynamo-vllm wake tiny")
        wait_for(lambda: status(container).get("ready"), 60, interval=1, what="awake again")
        exposure = container.run(f"systemd-analyze security --no-pager {UNIT} | tail -1").stdout
        print("systemd-analyze security with the checkpoint drop-in:", exposure.strip())
        base_port = container.base_port  # type: ignore[attr-defined]
        answer = httpx.post(f"http://127.0.0.1:{base_port}/v1/completions", timeout=60,
                            json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        # Two restores, two lines the restored worker itself wrote after its restore.
        container.wait(f"test $(journalctl --no-pager -o cat -u {UNIT} | "
                       "grep -c 'worker 0: restored after') -ge 2", 30,
                       "the restored worker's lines in the journal")
        container.run(f"systemctl stop {UNIT}", timeout=200)
        assert container.show(UNIT, "Result") == "success"
        assert agent_processes(container) == []

        # Another local user squats a saved /dev/shm name while the unit is down.
        saved = container.run("ls /var/lib/dynamo-vllm/checkpoints/tiny/*/shm/ | "
                              "grep '^psm_' | head -1").stdout.strip()
        assert saved, "no saved /dev/shm queue to squat"
        container.run("id intruder >/dev/null 2>&1 || useradd --no-create-home intruder")
        container.run(f"runuser -u intruder -- sh -c 'head -c 4096 /dev/zero > /dev/shm/{saved}'")
        try:
            container.run(f"systemctl start {UNIT}", timeout=600)
            squatted = status(container)
            assert squatted["ready"] and squatted["workers"][0]["restored"] is False, squatted
            journal = container.run(f"journalctl --no-pager -o cat -u {UNIT}").stdout
            assert f"/dev/shm/{saved} exists and is not the service's" in journal, \
                journal[-3000:]
            if split_restores:
                assert_unprivileged(container, "cold")
        finally:
            container.run(f"rm -f /dev/shm/{saved}")
        container.run(f"systemctl stop {UNIT}", timeout=200)
    finally:
        container.run(f"systemctl stop {UNIT}; rm -f {dropins}/checkpoint.conf "
                      f"{dropins}/zz-workers-as-root.conf; systemctl daemon-reload", timeout=200,
                      check=False)
        container.run(f"cat > /etc/dynamo-vllm/tiny.toml <<'EOF'\n{config}\nEOF")


def test_remove_stops_instances_and_purge_leaves_nothing(container: Container) -> None:
    # A running instance of stand-in workers: an engine start would prove nothing more.
    container.run("install -m 0755 /mnt/share/fake_worker.py /usr/local/lib/fake_worker.py")
    container.run("cat > /usr/local/bin/fake-python <<'EOF'\n#!/bin/sh\n"
                  'exec /usr/bin/python3 /usr/local/lib/fake_worker.py "$@"\nEOF\n'
                  "chmod 755 /usr/local/bin/fake-python")
    config = tomllib.loads(container.run("cat /etc/dynamo-vllm/tiny.toml").stdout)
    config["workers"].update(python="/usr/local/bin/fake-python", base_port=free_port())
    config["metrics"]["port"] = free_port()
    container.run(f"cat > /etc/dynamo-vllm/fake.toml <<'EOF'\n{tomli_w.dumps(config)}\nEOF")
    container.run("systemctl start dynamo-vllm@fake.service", timeout=120)
    assert any("fake_worker" in p or "dynamo_vllm.agent" in p for p in agent_processes(container))
    container.run("dpkg -r dynamo-vllm", timeout=200)
    assert agent_processes(container) == []
    assert container.run("test -e /opt/dynamo-vllm/venv || echo gone").stdout.strip() == "gone"
    purged = container.run("dpkg -P dynamo-vllm", timeout=120)
    left = container.run("ls -d /opt/dynamo-vllm /var/lib/dynamo-vllm/checkpoints "
                         "/var/cache/dynamo-vllm /etc/dynamo-vllm/example.toml "
                         "2>/dev/null || true").stdout.strip()
    assert left == "", left
    # The operator's models stay, and purge says so.
    assert container.run("ls -A /var/lib/dynamo-vllm").stdout.split() == ["models"]
    assert "kept /var/lib/dynamo-vllm" in purged.stderr, purged.stderr
    container.run("rm -rf /var/lib/dynamo-vllm")


def test_the_full_engine_deb_serves_through_the_frontend(container: Container) -> None:
    """The agent and the engine .deb (ai-dynamo included), no pip: an instance of two workers
    behind Dynamo's frontend, supervised by the unit. `systemctl start` returns once the
    frontend serves the model with both workers listed; the host's client goes through its
    one port; `systemctl reload` under streaming load rolls the workers one at a time and
    loses nothing; the frontend's own lines are in the unit's journal at their priority."""
    container.run("dpkg -i /mnt/share/dynamo-vllm.deb "
                  "/mnt/dist/dynamo-vllm-engine-cpu_*_amd64.deb", timeout=300)
    refused = container.run("dynamo-vllm engine install --cpu --wheelhouse /mnt/wheelhouse",
                            check=False)
    assert refused.returncode != 0 and "belongs to a Debian package" in refused.stderr
    container.run(f"dynamo-vllm tiny-model {GUEST_MODEL} && chown -R dynamo-vllm: {GUEST_MODEL}",
                  timeout=300)
    front = f"http://127.0.0.1:{free_port()}"
    config = tiny_instance_config(
        container.base_port, container.metrics_port, workers=2,  # type: ignore[attr-defined]
        dynamo='enabled = true\nfile_kv = "/var/lib/dynamo-vllm/dynamo-kv"',
        frontend=f"enabled = true\nport = {front.rsplit(':', 1)[1]}")
    container.run(f"cat > /etc/dynamo-vllm/tiny.toml <<'EOF'\n{config}\nEOF")
    started = time.monotonic()
    container.run(f"systemctl start {UNIT}", timeout=600)
    print(f"systemctl start with the frontend returned after {time.monotonic() - started:.1f} s")
    door = status(container)["frontend"]
    assert (door["state"], door["workers_listed"]) == ("serving", 2), door
    shown = container.run(f"systemctl status --no-pager {UNIT}", check=False).stdout
    assert 'Status: "2/2 workers serving; frontend serving' in shown, shown
    answer = httpx.post(f"{front}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == \
        "length", answer.text
    unknown = httpx.post(f"{front}/v1/completions", timeout=60,
                         json={"model": "nothing-here", "prompt": "x", "max_tokens": 2})
    assert unknown.status_code == 404, unknown.text

    # An engine setting changed: the reload rolls both workers, one at a time.
    pids = {w["worker"]: w["pid"] for w in status(container)["workers"]}
    load = SteadyStreams(front, concurrency=2).start()
    try:
        wait_for(lambda: len(load.results) >= 4, 60, what="steady streams")
        container.run("sed -i 's/max_num_seqs = 8/max_num_seqs = 6/' /etc/dynamo-vllm/tiny.toml")
        container.run(f"systemctl reload {UNIT}")
        container.wait(f"systemctl show -P ActiveState {UNIT} | grep -qx reloading", 30,
                       "ActiveState=reloading", interval=0.2)
        serving: list[int] = []

        def rolled() -> bool:
            workers = status(container).get("workers") or []
            serving.append(sum(w["state"] == "serving" for w in workers))
            return len(workers) == 2 and all(
                w["pid"] != pids[w["worker"]] and w["state"] == "serving" for w in workers)
        rolled_from = time.monotonic()
        wait_for(rolled, 400, interval=0.5, what="both workers rolled")
        print(f"the roll took {time.monotonic() - rolled_from:.1f} s")
        container.wait(f"systemctl show -P ActiveState {UNIT} | grep -qx active", 60, "active")
        during = len(load.results)
        wait_for(lambda: len(load.results) >= during + 2, 60, what="streams after the roll")
    finally:
        load.stop()
    assert load.failed() == [], f"{len(load.failed())} of {len(load.results)} streams " \
                                f"failed: {load.failed()[:3]}"
    assert min(serving) >= 1, serving
    assert container.show(UNIT, "NRestarts") == "0"
    assert "Reloaded" in container.run(f"journalctl --no-pager -o cat -u {UNIT}").stdout

    # The frontend's lines: under the unit, with its role, each at its own level (Dynamo
    # logs the 404 above at ERROR, its start at INFO).
    lines = journal_entries(container, f"-u {UNIT} ROLE=frontend")
    by_priority = {p: [e["MESSAGE"] for e in lines if e["PRIORITY"] == p] for p in ("3", "6")}
    print(f"{len(lines)} frontend entries, {len(by_priority['3'])} at err")
    assert any("status=404" in m for m in by_priority["3"]), lines[-10:]
    assert any("Starting HTTP(S) service" in m for m in by_priority["6"]), lines[:10]
    assert all(e.get("LOGGER") and e["SYSLOG_IDENTIFIER"] == "dynamo-vllm" for e in lines
               if "\n" not in e["MESSAGE"]), lines[:3]

    container.run(f"systemctl stop {UNIT}", timeout=200)
    assert container.show(UNIT, "Result") == "success"
    # Nothing left: the workers, the frontend and its journal relay.
    assert agent_processes(container) == []
    assert container.run("pgrep -f 'dynamo[.]frontend' || true").stdout.strip() == ""
    container.run("dpkg -P dynamo-vllm-engine-cpu dynamo-vllm", timeout=300)
    left = container.run("ls -d /opt/dynamo-vllm 2>/dev/null || true").stdout.strip()
    assert left == "", left
