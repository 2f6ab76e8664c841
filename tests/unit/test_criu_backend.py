"""The CRIU checkpointer's command lines and its error handling (a script stands in for the
criu binary here; tests/integration/test_checkpoint_restore.py runs the real one)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_vllm.supervisor.checkpoint import criu as criu_module
from dynamo_vllm.supervisor.checkpoint.criu import (
    CheckpointError,
    CriuCheckpointer,
    error_lines,
    seccomp_mode,
)


def test_dump_command() -> None:
    cmd = CriuCheckpointer("/opt/criu", timeout=5).dump_command(4242, Path("/s/tmp/h/images"),
                                                                 leave_running=False)
    assert cmd[:8] == ["/opt/criu", "dump", "-t", "4242", "-D", "/s/tmp/h/images", "-o",
                       "dump.log"]
    for flag in ("--tcp-close", "--ext-unix-sk", "--link-remap", "--ghost-limit",
                 "--skip-in-flight"):
        assert flag in cmd
    assert "--leave-running" not in cmd and "--shell-job" not in cmd and "-L" not in cmd
    cmd = CriuCheckpointer("criu", libdir="/usr/lib/criu").dump_command(
        1, Path("/i"), leave_running=True, stdio={"0": "/dev/pts/3", "1": "/dev/pts/3"})
    assert "--leave-running" in cmd and "--shell-job" in cmd
    assert cmd[cmd.index("-L") + 1] == "/usr/lib/criu"
    assert "--external" not in cmd


def test_a_stdio_socket_is_dumped_as_external_and_inherited_on_restore() -> None:
    # Under systemd, stdout and stderr are one stream socket to journald.
    journal = {"0": "/dev/null", "1": "socket:[81723]", "2": "socket:[81723]"}
    criu = CriuCheckpointer("criu")
    cmd = criu.dump_command(1, Path("/i"), leave_running=False, stdio=journal)
    assert cmd.count("--external") == 1
    assert cmd[cmd.index("--external") + 1] == "unix[81723]"
    cmd = criu.restore_command(Path("/i"), Path("/w"), journal)
    assert cmd[cmd.index("--inherit-fd") + 1] == "fd[1]:socket:[81723]"


def test_restore_hands_over_the_supervisors_stdout() -> None:
    backend = CriuCheckpointer("criu")
    journal = backend.restore_command(Path("/s/h/images"), Path("/run/x/criu/0"),
                                      {"0": "/dev/null", "1": "socket:[123]", "2": "socket:[123]"})
    assert journal[journal.index("-W") + 1] == "/run/x/criu/0"
    assert "-d" in journal and journal[journal.index("--pidfile") + 1].endswith("restored.pid")
    assert [journal[i + 1] for i, a in enumerate(journal) if a == "--inherit-fd"] == \
        ["fd[1]:socket:[123]"]
    split = backend.restore_command(Path("/i"), Path("/w"),
                                    {"1": "pipe:[7]", "2": "/var/log/x.log"})
    assert [split[i + 1] for i, a in enumerate(split) if a == "--inherit-fd"] == \
        ["fd[1]:pipe:[7]", "fd[2]:var/log/x.log"]
    tty = backend.restore_command(Path("/i"), Path("/w"), {"1": "/dev/pts/3"})
    assert "--shell-job" in tty and "--inherit-fd" not in tty


def test_error_lines_keep_criu_s_reasons() -> None:
    log = ("(00.02) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n"
           "(00.61) Error (criu/files-reg.c:1122): Can't create link remap for /dev/shm/sem.x\n"
           "(00.61) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
    assert error_lines(log) == ("Error (criu/files-reg.c:1122): Can't create link remap for "
                                "/dev/shm/sem.x | Error (criu/cr-dump.c:1975): Dumping FAILED.")
    assert error_lines("just\nsome words\n") == "just | some words"


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-criu"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_check_says_why_it_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    assert "not found" in (CriuCheckpointer(str(tmp_path / "nope")).check() or "")
    failing = _script(tmp_path, 'echo "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area '
                                'bounds"; exit 1\n')
    reason = CriuCheckpointer(failing).check() or ""
    assert "check` failed" in reason and "Unexpected rt vDSO area bounds" in reason
    assert CriuCheckpointer(_script(tmp_path, "exit 0\n")).check() is None
    # A criu that hangs is reported, never waited for.
    monkeypatch.setattr(criu_module, "CHECK_TIMEOUT_S", 0.5)
    assert "did not finish" in (CriuCheckpointer(_script(tmp_path, "sleep 30\n")).check() or "")


def test_a_failed_dump_raises_with_the_log(tmp_path: Path) -> None:
    fake = _script(tmp_path, 'echo "(0.1) Error (criu/cr-dump.c:1): No space left on device" '
                             '> "$5/dump.log"; exit 1\n')
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(CheckpointError, match=r"criu exit 1.*No space left on device"):
        asyncio.run(CriuCheckpointer(fake, timeout=10).dump(999999, images, False))


def test_a_hung_restore_times_out(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    backend = CriuCheckpointer(_script(tmp_path, "sleep 30\n"), timeout=0.5)
    with pytest.raises(CheckpointError, match=r"did not finish within 0\.5 s"):
        asyncio.run(backend.restore(images, tmp_path / "work", {}))


def test_a_restore_without_a_pid_is_a_failure(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(CheckpointError, match="gave no pid"):
        asyncio.run(CriuCheckpointer(_script(tmp_path, "exit 0\n"), timeout=5).restore(
            images, tmp_path / "work", {}))


# A child that installs an allow-everything seccomp filter (the kind systemd's sandboxing
# settings install), then asks the checkpointer whether dumps can work.
UNDER_SECCOMP = """
import ctypes, sys
from dynamo_vllm.supervisor.checkpoint.criu import CriuCheckpointer, seccomp_mode

class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

libc = ctypes.CDLL(None, use_errno=True)
allow = (Insn * 1)(Insn(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K, SECCOMP_RET_ALLOW
prog = Prog(1, allow)
assert seccomp_mode() == 0
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP
print(seccomp_mode())
print(CriuCheckpointer(sys.argv[1]).check())
"""


def test_checkpoints_are_refused_under_a_seccomp_filter(tmp_path: Path) -> None:
    # `criu check` itself would pass here; the dump would fail. The binary is never run.
    out = subprocess.run([sys.executable, "-c", UNDER_SECCOMP, str(tmp_path / "no-criu")],
                         capture_output=True, text=True, timeout=60, check=True)
    mode, reason = out.stdout.splitlines()
    assert mode == "2"
    assert "seccomp filter (Seccomp: 2)" in reason and "checkpoint.conf.example" in reason


def test_without_a_filter_the_check_goes_on_to_criu(tmp_path: Path) -> None:
    assert seccomp_mode() == 0
    assert "not found" in str(CriuCheckpointer(str(tmp_path / "no-criu")).check())
