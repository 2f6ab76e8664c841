"""The faults the soak injects, each with how it is done and what "recovered" means.

A fault hits one worker (or, for etcd, the node). `inject` returns what `recovered` needs
to compare against; `recovered` is polled until it holds or the fault's time is up.
Process faults end or hang an engine: for them the time until the supervisor stops
calling the worker serving is measured against a bound computed from the config.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from tests.harness import b64, prefix_end

if TYPE_CHECKING:
    from tests.soak.harness import Soak

DEAD, HUNG, GONE, STOPPED = "dead", "hung", "gone", "stopped"


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: Callable[[Soak, int], Any]
    recovered: Callable[[Soak, int, Any], bool]
    # How the supervisor learns of it (None: it is not a failure of the worker).
    detection: str | None = None
    cleanup: Callable[[Soak, int, Any], None] | None = None
    available: Callable[[Soak], str | None] = lambda soak: None
    # When the fault really struck, if not at injection (the kernel's OOM kill comes when
    # the engine next needs a page): polled until true; detection is timed from then.
    struck: Callable[[Soak, int, Any], bool] | None = None


def _pid(soak: Soak, worker: int) -> int:
    # Never None: psutil.Process(None) is this very process, whose tree holds every
    # worker, and the fault would land on another worker's engine.
    pid = soak.worker(worker)["pid"]
    if not isinstance(pid, int):
        raise AssertionError(f"worker {worker} has no process now")
    return pid


def _tree(soak: Soak, worker: int, name: str) -> psutil.Process:
    pid = _pid(soak, worker)
    children = psutil.Process(pid).children(recursive=True)
    # The process vLLM titled so (comm is cut at 15 characters) first; a command line that
    # starts with the name only if none is.
    for matches in (lambda p: p.name() in (name, name[:15]),
                    lambda p: " ".join(p.cmdline()).startswith(name)):
        for child in children:
            with contextlib.suppress(psutil.Error):
                if matches(child):
                    return child
    raise AssertionError(f"worker {worker} (pid {pid}) has no {name} process")


def _signal_process(name: str, sig: signal.Signals) -> Callable[[Soak, int], Any]:
    def inject(soak: Soak, worker: int) -> Any:
        before = soak.worker(worker)["restarts"]
        os.kill(_tree(soak, worker, name).pid, sig)
        return before
    return inject


def _signal_group(sig: signal.Signals) -> Callable[[Soak, int], Any]:
    def inject(soak: Soak, worker: int) -> Any:
        before = soak.worker(worker)["restarts"]
        os.killpg(_pid(soak, worker), sig)
        return before
    return inject


def _restarted(soak: Soak, worker: int, before: Any) -> bool:
    now = soak.worker(worker)
    return bool(now["restarts"] > before and now["state"] == "serving")


# ------------------------------------------------------------------ sleep and wake

def _sleep_wake(soak: Soak, worker: int) -> Any:
    before = soak.worker(worker)["restarts"]
    soak.cli("sleep", "--worker", str(worker), "--level", "1")
    soak.wait(lambda: soak.worker(worker)["state"] == "sleeping", 60, "asleep")
    soak.cli("wake", "--worker", str(worker))
    return before


def _awake(soak: Soak, worker: int, before: Any) -> bool:
    now = soak.worker(worker)
    return bool(now["state"] == "serving" and now["restarts"] == before)


# ------------------------------------------------------------------ etcd

def _etcd_restart(soak: Soak, worker: int) -> Any:
    soak.etcd.stop()
    time.sleep(3.0)  # longer than the workers' keep-alive period
    soak.etcd.start()
    return time.monotonic()


def _registered(soak: Soak, worker: int, restarted: Any) -> bool:
    """Every worker's record is in etcd under a lease that is kept alive: checked once
    more than a lease's TTL has passed since etcd came back (etcd keeps keys and leases
    across a restart; a lease nobody renews would have expired by then)."""
    if time.monotonic() - restarted < soak.lease_ttl + 1.0:
        return False
    try:
        data = soak.etcd.call("/v3/kv/range", {"key": b64(soak.etcd_prefix),
                                               "range_end": prefix_end(soak.etcd_prefix)})
        leases = [kv.get("lease") for kv in data.get("kvs", [])]
        alive = [lease for lease in leases if lease and
                 int(soak.etcd.call("/v3/lease/timetolive", {"ID": lease}).get("TTL", -1)) > 0]
    except Exception:
        return False
    return len(alive) == soak.workers


# ------------------------------------------------------------------ directories

def _tokens_exported(soak: Soak, worker: int) -> float:
    for line in soak.scrape().splitlines():
        if line.startswith("vllm:generation_tokens_total{") and f'worker="{worker}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def _remove_metrics_dir(soak: Soak, worker: int) -> Any:
    before = _tokens_exported(soak, worker)
    assert before >= 0, "no vllm:generation_tokens_total for the worker before the fault"
    shutil.rmtree(soak.runtime / "metrics" / f"worker{worker}")
    return before


def _metrics_back(soak: Soak, worker: int, before: Any) -> bool:
    # Back, and continuous: the counter goes on from where it was, no reset.
    return bool((soak.runtime / "metrics" / f"worker{worker}").is_dir()
                and _tokens_exported(soak, worker) > before)


def _remove_control_dir(soak: Soak, worker: int) -> Any:
    before = soak.metric_value("dynamo_agent_restores_total",
                               {"worker": str(worker), "result": "restored"})
    shutil.rmtree(soak.runtime / "control" / str(worker))
    soak.wait(lambda: (soak.runtime / "control" / str(worker)).is_dir(), 10,
              "the control directory put back")
    # What the directory is for: the next start restores from the checkpoint.
    os.killpg(_pid(soak, worker), signal.SIGKILL)
    return before


def _restored_again(soak: Soak, worker: int, before: Any) -> bool:
    now = soak.worker(worker)
    restored = soak.metric_value("dynamo_agent_restores_total",
                                 {"worker": str(worker), "result": "restored"})
    return bool(now["state"] == "serving" and now["restored"] and restored > before)


# ------------------------------------------------------------------ checkpoint disk full

def _fill_store(soak: Soak, worker: int) -> Any:
    status = soak.worker(worker)
    shutil.rmtree(soak.store / status["checkpoint_hash"])
    ballast = soak.store / "ballast"
    free = os.statvfs(soak.store).f_bavail * os.statvfs(soak.store).f_frsize
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - 4096, 1))
    refused = soak.cli("checkpoint", "--worker", str(worker), check=False)
    assert refused.returncode != 0, f"a checkpoint on a full disk succeeded:\n{refused.stdout}"
    soak.notes.append(f"checkpoint on a full store: exit {refused.returncode}: "
                      f"{(refused.stderr or refused.stdout).strip().splitlines()[-1][:160]}")
    ballast.unlink()
    asked = time.monotonic()
    taken = soak.cli("checkpoint", "--worker", str(worker), check=False)
    return taken, asked


def _checkpoint_taken(soak: Soak, worker: int, before: Any) -> bool:
    # Taken, and the worker serves in the life restored from it (the dump ended the one
    # that was asked; the restored life began after the request).
    taken, asked = before
    now = soak.worker(worker)
    uptime = now.get("uptime_s")
    return bool(taken.returncode == 0 and now["state"] == "serving"
                and uptime is not None and uptime <= time.monotonic() - asked
                and (soak.store / now["checkpoint_hash"]).is_dir())


def _no_ballast(soak: Soak, worker: int, before: Any) -> None:
    with contextlib.suppress(FileNotFoundError):
        (soak.store / "ballast").unlink()


# ------------------------------------------------------------------ out of memory

def memory_cgroup_root() -> Path | None:
    """This process's cgroup v1 memory directory, where children may be made."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            here = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (here / "memory.limit_in_bytes").exists() and os.access(here, os.W_OK):
                return here
    return None


def _needs_checkpoints(soak: Soak) -> str | None:
    return None if soak.settings.checkpoints else "the soak runs with checkpoints off"


def _needs_checkpoints_on_request(soak: Soak) -> str | None:
    if soak.settings.frontend:
        # The worker refuses (409): a life restored from an image of a serving member of
        # Dynamo's runtime would carry its instance id.
        return "with [dynamo] on, checkpoints are taken as workers start, not on request"
    return _needs_checkpoints(soak)


def _oom_available(soak: Soak) -> str | None:
    if memory_cgroup_root() is None:
        return "no writable cgroup v1 memory controller here"
    return None


def _oom(soak: Soak, worker: int) -> Any:
    root = memory_cgroup_root()
    assert root is not None
    group = root / f"dynamo-vllm-soak-{os.getpid()}-{worker}"
    group.mkdir()
    before = soak.worker(worker)["restarts"]
    # One page, set while the group is empty: a limit written once the engine is inside
    # fails (EBUSY) when the engine has charged more than that in between and it cannot be
    # reclaimed. Moving a process in does not charge what it already holds, so the first
    # pages it needs afterwards (a request's tensors) cannot be had: OOM.
    (group / "memory.limit_in_bytes").write_text("4096")
    try:
        # The engine's processes only: the limit counts what they allocate from now on.
        for name in ("VLLM::EngineCore", "VLLM::Worker"):
            (group / "cgroup.procs").write_text(str(_tree(soak, worker, name).pid))
    except BaseException:
        _release_group(group)
        raise
    return before, group


def _release_group(group: Path) -> None:
    """Moves whatever was put in the group back to its parent, then removes it."""
    for pid in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            (group.parent / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


def _oom_killed(soak: Soak, worker: int, before: Any) -> bool:
    _, group = before
    text = (group / "memory.oom_control").read_text()
    kills = [int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")]
    return bool(kills and kills[0] > 0)


def _oom_recovered(soak: Soak, worker: int, before: Any) -> bool:
    restarts, _ = before
    return _oom_killed(soak, worker, before) and _restarted(soak, worker, restarts)


def _remove_group(soak: Soak, worker: int, before: Any) -> None:
    _, group = before
    left = (group / "cgroup.procs").read_text().split() if group.exists() else []
    if left:
        soak.notes.append(f"oom: processes still in the limited cgroup after recovery: {left}")
    deadline = time.monotonic() + 20
    while group.exists() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            group.rmdir()
        time.sleep(0.2)


FAULTS = [
    Fault("kill_engine_core", "SIGKILL of the EngineCore",
          _signal_process("VLLM::EngineCore", signal.SIGKILL), _restarted, DEAD),
    Fault("stop_engine_core", "SIGSTOP of the EngineCore",
          _signal_process("VLLM::EngineCore", signal.SIGSTOP), _restarted, HUNG),
    Fault("kill_vllm_worker", "SIGKILL of the vLLM Worker process",
          _signal_process("VLLM::Worker", signal.SIGKILL), _restarted, DEAD),
    Fault("stop_vllm_worker", "SIGSTOP of the vLLM Worker process",
          _signal_process("VLLM::Worker", signal.SIGSTOP), _restarted, HUNG),
    Fault("kill_worker", "SIGKILL of the whole worker (its process group)",
          _signal_group(signal.SIGKILL), _restarted, GONE),
    Fault("stop_worker", "SIGSTOP of the whole worker (its process group)",
          _signal_group(signal.SIGSTOP), _restarted, STOPPED),
    Fault("oom", "the kernel OOM-kills the engine (a one-page cgroup memory limit)",
          _oom, _oom_recovered, DEAD, cleanup=_remove_group, available=_oom_available,
          struck=_oom_killed),
    Fault("sleep_wake", "dynamo-vllm sleep, then wake", _sleep_wake, _awake),
    Fault("etcd_restart", "etcd stopped for 3 s, then started", _etcd_restart, _registered),
    Fault("metrics_dir_removed", "the worker's metrics directory removed",
          _remove_metrics_dir, _metrics_back),
    Fault("control_dir_removed", "the worker's checkpoint control directory removed, then "
          "the worker killed", _remove_control_dir, _restored_again, available=_needs_checkpoints),
    Fault("checkpoint_disk_full", "the checkpoint store full during a checkpoint",
          _fill_store, _checkpoint_taken, cleanup=_no_ballast,
          available=_needs_checkpoints_on_request),
]


def run_cli(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
