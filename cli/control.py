"""Commands that talk to a running instance: status, endpoints, sleep/wake, checkpoints,
reload."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from dynamo_vllm.cli.common import (
    control_workers,
    echo_json,
    load_or_exit,
    request,
    supervisor_get,
    supervisor_post,
    supervisor_url,
    worker_indices,
)


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="The supervisor's /status, as JSON.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
def status(target: str, as_json: bool, timeout: float) -> None:
    """Show a running instance's workers (pid, port, state, restarts, last exit, uptime) and
    its frontend, if it runs one."""
    data = supervisor_get(target, "/status", timeout)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{data.get('instance')}: {data.get('status')}")
    header = f"{'WORKER':>6}  {'PID':>8}  {'PORT':>5}  {'STATE':<10} {'RESTARTS':>8}  " \
             f"{'UPTIME':>8}  LAST EXIT"
    click.echo(header)
    for w in data.get("workers", []):
        uptime = f"{w['uptime_s']:.0f}s" if w.get("uptime_s") is not None else "-"
        click.echo(f"{w['worker']:>6}  {w.get('pid') or '-':>8}  {w['port']:>5}  "
                   f"{w['state']:<10} {w['restarts']:>8}  {uptime:>8}  "
                   f"{w.get('failed_reason') or w.get('last_exit') or '-'}")
    front = data.get("frontend")
    if front:
        click.echo(f"frontend: {front['state']} ({front['reason']}); pid {front.get('pid') or '-'}"
                   f", {front['restarts']} restart(s)")


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: every worker).")
@click.option("--level", type=click.IntRange(0, 2), default=1, show_default=True,
              help="0: pause, keep memory; 1, 2: vLLM's sleep levels (GPU memory released).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON list, an object per worker (code, status, message, ...).")
def sleep(target: str, worker: int | None, level: int, as_json: bool) -> None:
    """Take workers out of service: unregister, drain, then pause or sleep the engine."""
    control_workers(target, worker, "/engine/sleep", {"level": level}, as_json)


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: every worker).")
@click.option("--tags", multiple=True, type=click.Choice(["weights", "kv_cache"]),
              help="Wake only these parts (level 1 and 2); default: everything.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON list, an object per worker (code, status, message, ...).")
def wake(target: str, worker: int | None, tags: tuple[str, ...], as_json: bool) -> None:
    """Wake sleeping workers; each registers again once fully awake."""
    control_workers(target, worker, "/engine/wake_up", {"tags": list(tags)} if tags else {},
                    as_json)


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="The supervisor's /endpoints, as JSON.")
def endpoints(target: str, as_json: bool) -> None:
    """What discovery holds for an instance: the workers that serve."""
    data = supervisor_get(target, "/endpoints", 5.0)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"discovery: {data.get('backend')} ({data.get('path')})")
    if data.get("error"):
        click.echo(f"error: {data['error']}", err=True)
    for record in data.get("endpoints", []):
        click.echo(f"worker {record.get('worker')}: http://{record.get('host')}:"
                   f"{record.get('port')} model={record.get('model')} "
                   f"state={record.get('state')} pid={record.get('pid')}")


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: each, one at a time).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON list, an object per worker (code, status, message, ...).")
def checkpoint(target: str, worker: int | None, as_json: bool) -> None:
    """Take a checkpoint of a serving worker now (the running supervisor does it).

    The worker leaves the pool, drains, pauses and is dumped with CRIU into the store; the
    supervisor then restores it from that checkpoint, so it serves again within seconds.
    A checkpoint stored already for the worker's current hash is kept (nothing is taken).
    Needs checkpoint.enabled.
    """
    from dynamo_vllm.contract.protocol import Route

    cfg = load_or_exit(target, check_paths=False)
    failed = False
    results = []
    for index in worker_indices(cfg, worker):
        code, answer = supervisor_post(cfg, Route.CHECKPOINT, {"worker": index},
                                        cfg.checkpoint.timeout + 90)
        failed |= code != 200
        results.append({"worker": index, "code": code, **answer})
        if as_json:
            continue
        if code == 200:
            click.echo(f"worker {index}: {answer.get('result')}: {answer.get('message')}")
        else:
            click.echo(f"worker {index}: error: {answer.get('error') or answer.get('message')}",
                       err=True)
    if as_json:
        echo_json(results)
    if failed:
        sys.exit(1)


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path),
              help="The checkpoint store (default: the running supervisor's, else "
                   "checkpoint.store).")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def checkpoints(target: str, store: Path | None, as_json: bool) -> None:
    """List the checkpoints of an instance: hash, worker, size, age and state.

    `current` marks the checkpoint a worker of the running supervisor would restore from;
    `in progress` is one being written (under tmp/, removed at start if a crash left it).
    """
    from dynamo_vllm.supervisor.checkpoint.store import CheckpointStore
    from dynamo_vllm.supervisor.report import duration
    from dynamo_vllm.supervisor.runtime_dir import RuntimeDirError

    cfg = load_or_exit(target, check_paths=False)
    current: dict[str, int] = {}
    code, status = request(supervisor_url(cfg, "/status"), timeout=5)
    if code == 200:
        store = store or Path((status.get("checkpoint") or {}).get("store") or "") or None
        current = {str(w.get("checkpoint_hash")): int(w["worker"])
                   for w in status.get("workers", []) if w.get("checkpoint_hash")}
    if store is None and cfg.checkpoint.store:
        store = Path(cfg.checkpoint.store)
    if store is None:
        click.echo(f"{target}: no supervisor answers and checkpoint.store is not set: give "
                   "--store", err=True)
        sys.exit(3)
    try:
        entries = CheckpointStore(store, cfg.checkpoint.keep).entries()
    except (OSError, RuntimeDirError) as exc:
        click.echo(f"{target}: cannot read the checkpoint store {store}: "
                   f"{getattr(exc, 'strerror', None) or exc} (run as root or the service "
                   "user)", err=True)
        sys.exit(1)
    now = time.time()
    rows: list[dict[str, Any]] = [{"hash": e.checkpoint_hash, "worker": e.metadata.get("worker"),
             "size_bytes": e.size_bytes, "age_s": round(now - e.created, 1),
             "state": "current" if e.state == "complete" and e.checkpoint_hash in current
             else e.state} for e in entries]
    if as_json:
        click.echo(json.dumps({"store": str(store), "checkpoints": rows}, indent=2))
        return
    click.echo(f"store: {store}")
    if not rows:
        click.echo("no checkpoints")
        return
    click.echo(f"{'hash':<34} {'worker':>6} {'size':>10} {'age':>10}  state")
    for row in rows:
        size = f"{row['size_bytes'] / 2**20:.0f} MiB"
        worker = "-" if row["worker"] is None else str(row["worker"])
        click.echo(f"{row['hash']:<34} {worker:>6} {size:>10} {duration(row['age_s']):>10}  "
                   f"{row['state']}")


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: each, one at a time).")
@click.option("--timeout", default=300.0, show_default=True,
              help="Seconds to wait for each worker to serve again.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON list, an object per worker (code, status, message, ...).")
def restore(target: str, worker: int | None, timeout: float, as_json: bool) -> None:
    """Restart a worker from its checkpoint (the running supervisor does it).

    The worker stops gracefully and is restored from the checkpoint stored for its current
    hash; this waits until it serves again. With checkpoint.restore (the default) every
    start restores by itself: this is for doing it now.
    """

    cfg = load_or_exit(target, check_paths=False)
    results: list[dict[str, Any]] = []
    for index in worker_indices(cfg, worker):
        result = _restore_one(cfg, index, timeout, as_json)
        results.append(result)
        if result["outcome"] != "serving":
            break
    if as_json:
        echo_json(results)
    if any(r["outcome"] != "serving" for r in results):
        sys.exit(1)


def _restore_one(cfg: Any, index: int, timeout: float, quiet: bool) -> dict[str, Any]:
    """Ask for worker `index`'s restore and wait until it serves: its result."""
    from dynamo_vllm.contract.protocol import Route

    def say(line: str, err: bool = False) -> None:
        if not quiet:
            click.echo(line, err=err)

    code, answer = supervisor_post(cfg, Route.RESTORE, {"worker": index}, 30)
    if code != 202:
        message = answer.get("error") or answer.get("message")
        say(f"worker {index}: error: {message}", err=True)
        return {"worker": index, "code": code, "outcome": "refused", "message": message}
    say(f"worker {index}: {answer.get('message')}")
    deadline = time.monotonic() + timeout
    time.sleep(1.0)
    while time.monotonic() < deadline:
        _, status = request(supervisor_url(cfg, "/status"), timeout=5)
        view: dict[str, Any] = next(
            (w for w in status.get("workers", []) if w.get("worker") == index), {})
        if view.get("state") == "serving":
            restored = bool(view.get("restored"))
            say(f"worker {index}: serving, "
                f"{'restored' if restored else 'started cold (see the log)'}")
            return {"worker": index, "code": code, "outcome": "serving",
                    "restored": restored, "pid": view.get("pid")}
        time.sleep(0.5)
    say(f"worker {index}: not serving after {timeout:g} s", err=True)
    return {"worker": index, "code": code, "outcome": "timed out"}


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the reload to end (a roll of the workers takes minutes) and "
                   "report its outcome; exit 1 if it was refused or failed.")
@click.option("--timeout", default=1800.0, show_default=True,
              help="Seconds to wait for the reload to end.")
@click.option("--json", "as_json", is_flag=True, help="The outcome as JSON.")
def reload(target: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Apply the config file again (SIGHUP to the supervisor, what `systemctl reload` sends).

    Workers roll one at a time when a setting of theirs changed; settings only a restart
    applies are named (docs/operations.md, "What a reload applies")."""
    import os
    import signal

    before = supervisor_get(target, "/status", 5.0)
    # A reload running now ends first; ours is the one after it: wait until a reload has
    # finished that started after this point.
    seen = int((before.get("reload") or {}).get("started", 0))
    try:
        os.kill(int(before["pid"]), signal.SIGHUP)
    except PermissionError:
        click.echo(f"{target}: not allowed to signal the supervisor (pid {before['pid']}): run "
                   "as root or the service user, or use systemctl reload", err=True)
        sys.exit(1)
    except ProcessLookupError:
        click.echo(f"{target}: the supervisor (pid {before['pid']}) is gone", err=True)
        sys.exit(3)
    if not wait:
        click.echo(f"{target}: reload requested")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = supervisor_get(target, "/status", 5.0).get("reload") or {}
        if int(record.get("finished", 0)) > seen:
            outcome = str(record.get("outcome", ""))
            if as_json:
                click.echo(json.dumps(record, indent=2))
            else:
                click.echo(f"{target}: reload {outcome}")
            sys.exit(0 if outcome.startswith("done") else 1)
        time.sleep(0.5)
    click.echo(f"{target}: the reload did not end within {timeout:g} s", err=True)
    sys.exit(1)
