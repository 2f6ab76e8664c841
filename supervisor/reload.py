"""`systemctl reload` (SIGHUP): apply the config file again, without a gap in service.

Settings only the supervisor reads apply at once; a change of the worker's view of the
config (`contract.config.worker_view`) rolls the workers one at a time, each serving again
before the next goes; more or fewer workers start or stop. Settings only a restart applies
(supervisor/restart_only.py) are named in the log and STATUS=. A refused or failed reload
leaves the previous config running, and says so in STATUS=.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dynamo_vllm.contract import config as config_module
from dynamo_vllm.contract.config import worker_view
from dynamo_vllm.supervisor.control_token import with_default_token
from dynamo_vllm.supervisor.restart_only import restart_only_changes
from dynamo_vllm.supervisor.startup import StartupError
from dynamo_vllm.supervisor.worker_process import WorkerSpec

if TYPE_CHECKING:
    from dynamo_vllm.supervisor.daemon import Supervisor

log = logging.getLogger(__name__)

# How often a roll checks whether the restarted worker serves again.
ROLL_POLL_S = 0.5


@dataclass
class ReloadRecord:
    """What `/status` says of reloads: `dynamo-vllm reload --wait` waits for `finished` to
    pass the count it saw, then reports `outcome`."""

    started: int = 0
    finished: int = 0
    outcome: str = ""
    # Settings changed since the start that only a restart applies (restart_only.py).
    restart_pending: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "finished": self.finished, "outcome": self.outcome,
                "restart_pending": list(self.restart_pending)}

    def pending_text(self) -> str:
        """The end of STATUS= and of a reload's outcome while settings wait for a restart."""
        if not self.restart_pending:
            return ""
        return "; restart to apply " + ", ".join(self.restart_pending)


async def reload(supervisor: Supervisor) -> None:
    """SIGHUP: apply the config file again. Ends with READY=1 and a STATUS= that says
    whether the reload was refused, failed, or done (unless the service stops meanwhile:
    then STOPPING=1 follows instead)."""
    record = supervisor.reloads
    record.started += 1
    supervisor.notifier.reloading("reloading the config")
    # Stays so only if the reload is cancelled (the service stops) or has a bug.
    outcome = "ended early: the service stopped, or see the log"
    try:
        outcome = await _reload(supervisor)
    finally:
        record.finished, record.outcome = record.started, outcome


async def _reload(supervisor: Supervisor) -> str:
    try:
        rolled = await _apply(supervisor)
    except (config_module.ConfigError, StartupError) as exc:
        errors = exc.errors if isinstance(exc, config_module.ConfigError) else [str(exc)]
        for line in errors:
            log.error("reload refused: %s", line)
        supervisor.notifier.ready(f"reload refused ({errors[0]}); running the previous config")
        return f"refused: {'; '.join(errors)}"
    except Exception as exc:
        log.exception("reload failed")
        supervisor.notifier.ready(f"reload failed ({type(exc).__name__}: {exc}); see the log")
        return f"failed: {type(exc).__name__}: {exc}"
    if rolled is None:
        return "interrupted: the service is stopping"
    # Against what is running since the start: a key changed by an earlier reload still
    # waits for its restart.
    pending = restart_only_changes(supervisor.started_config, supervisor.config)
    supervisor.reloads.restart_pending = [key for key, _ in pending]
    for key, why in pending:
        log.warning("reload: %s changed, not applied: a restart applies it (%s)", key, why)
    supervisor.notifier.ready(supervisor.status_line(time.monotonic()))
    done = "done" + (" (workers rolled)" if rolled else "") + supervisor.reloads.pending_text()
    log.info("reload %s", done)
    return done


async def _apply(supervisor: Supervisor) -> bool | None:
    """Apply the config file again; True when the workers rolled, None when the
    service stopped meanwhile. Raises ConfigError/StartupError before changing anything."""
    new = with_default_token(config_module.load(supervisor.config_path), supervisor.runtime_dir)
    specs = supervisor.specs(new)
    chrek = supervisor.chrek
    if chrek is not None:
        names = await asyncio.to_thread(chrek.gpu_names)
        old, chrek.config = chrek.config, new
        try:
            for spec in specs:
                await chrek.assign(spec, names)
        except BaseException:
            chrek.config = old
            raise
    worker_view_changed = worker_view(supervisor.config) != worker_view(new)
    supervisor.config = new
    supervisor.write_effective_config()
    for handle in supervisor.handles:
        handle.policy.retune(new.workers)
    supervisor.metrics.workers_desired.set(new.workers.count)
    supervisor.metrics.min_ready.set(new.min_ready)
    logging.getLogger().setLevel(new.logging.level.upper())
    # Fewer workers: stop the surplus. More: start the new ones.
    for handle in [h for h in supervisor.handles if h.spec.index >= new.workers.count]:
        handle.request_stop()
        await handle.stop(new.workers.stop_timeout)
        await supervisor.tasks.pop(handle.spec.index)
        supervisor.handles.remove(handle)
    for spec in specs[len(supervisor.handles):]:
        supervisor.add_worker(spec)
    if worker_view_changed:
        await _roll(supervisor, specs)
    return None if supervisor.stopping else worker_view_changed

async def _roll(supervisor: Supervisor, specs: list[WorkerSpec]) -> None:
    """Restart workers one at a time, each serving again before the next goes."""
    for handle, spec in zip(list(supervisor.handles), specs, strict=False):
        if supervisor.stopping:
            return
        if handle.failed:
            continue  # its task ended; a new config gets a new chance
        others = sum(1 for h in supervisor.handles if h is not handle and h.serving)
        if others < supervisor.config.min_ready:
            log.warning("rolling worker %s leaves %d serving (min_ready %d)", handle.name,
                        others, supervisor.config.min_ready)
        handle.request_restart(spec)
        await handle.stop(supervisor.config.workers.stop_timeout)
        deadline = time.monotonic() + supervisor.config.workers.start_timeout
        while not supervisor.stopping and time.monotonic() < deadline:
            if handle.serving or handle.failed:
                break
            await asyncio.sleep(ROLL_POLL_S)
    for handle in supervisor.handles:
        if handle.failed:
            handle.retry(supervisor.policy())
            supervisor.supervise(handle)
