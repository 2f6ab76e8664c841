"""The long soak, on demand: `make soak` (SOAK_DURATION seconds, SOAK_SEED).

    python -m tests.soak.run --model .tiny-model --duration 1800 --seed 7 --out build/soak

Writes report.md (the tables and the violations) and the supervisor's log to --out, and
exits 1 when an invariant was broken.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import CRIU
from tests.soak.harness import EVERY_FAULT, SoakSettings, copy_logs, run_soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=1800.0,
                        help="seconds of faults (0: each fault once)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--faults", default=",".join(f.name for f in EVERY_FAULT),
                        help="comma-separated fault names")
    parser.add_argument("--frontend", action="store_true",
                        help="the load through Dynamo's frontend, with its faults")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="cold starts only (the two checkpoint faults are skipped)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("build/soak"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the soak needs root (a tmpfs for the store, CRIU)")
    settings = SoakSettings(seed=args.seed, duration=args.duration,
                            faults=tuple(args.faults.split(",")), clients=args.clients,
                            frontend=args.frontend, checkpoints=not args.no_checkpoints)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dynamo-vllm-soak-") as tmp:
        report, soak = run_soak(args.model.resolve(), CRIU, Path(tmp), settings)
        copy_logs(soak, args.out)
    how = (" through the frontend" if args.frontend else "") + \
        (", checkpoints off" if args.no_checkpoints else "")
    header = (f"# Soak{how}: seed {args.seed}, {args.duration:g} s of faults, {args.clients} "
              f"clients, {time.monotonic() - started:.0f} s in all\n\n"
              f"Machine: {platform.node()}, {os.cpu_count()} CPUs, "
              f"{platform.platform()}, Python {platform.python_version()}\n\n")
    (args.out / "report.md").write_text(header + report)
    print(header + report)
    return 1 if soak.violations else 0


if __name__ == "__main__":
    sys.exit(main())
