"""The privilege split: a supervisor that runs as root (the checkpoint drop-in, for CRIU)
runs everything that faces clients or loads a model, its workers (vLLM's API server,
EngineCore and its workers) and Dynamo's frontend, as the service user, with no
capabilities and no way to gain any.

Only the supervisor and the CRIU it runs keep root. The workers are exec'd through util-
linux's `setpriv` (no pre-exec hook in a threaded parent): real, effective and saved ids
of the service user, its groups, the inheritable, ambient and bounding capability sets
emptied, and no_new_privs, so not even a set-uid binary gives anything back. CRIU restores
those credentials with the process, so a restored worker is as unprivileged as a cold one.
The supervisor hands the worker the few paths it writes (its metric and control
directories, the token, the discovery records, a cache and home of its own).
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from dynamo_vllm.contract.config import Config
from dynamo_vllm.supervisor.startup import StartupError

# Set by systemd/checkpoint.conf.example: the account the workers run as when the unit
# runs its supervisor as root (workers.user overrides it).
WORKER_USER_ENV = "DYNAMO_VLLM_WORKER_USER"


@dataclass(frozen=True)
class WorkerAccount:
    name: str
    uid: int
    gid: int

    def command_prefix(self) -> list[str]:
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                "--no-new-privs", "--"]

    def hand_over(self, path: Path, mode: int) -> None:
        """Make `path` the worker's, with `mode`; a symlink is refused, never followed."""
        if path.is_symlink():
            raise StartupError(f"{path}: a symlink where the worker's own path belongs")
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)

    def let_in(self, path: Path, mode: int = 0o710) -> None:
        """Keep `path` root's but let the worker's group traverse (or read) it."""
        os.chown(path, 0, self.gid, follow_symlinks=False)
        os.chmod(path, mode)

    def cache_environment(self, cache: Path) -> dict[str, str]:
        """A home and caches of the worker's own: under the checkpoint drop-in the unit's
        state and cache directories are root's."""
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.hand_over(cache, 0o700)
        return {"HOME": str(cache), "XDG_CACHE_HOME": str(cache),
                "VLLM_CACHE_ROOT": str(cache / "vllm"), "HF_HOME": str(cache / "huggingface"),
                "USER": self.name, "LOGNAME": self.name}


def worker_account(configured: str) -> WorkerAccount | None:
    """The account workers run as: `workers.user`, else DYNAMO_VLLM_WORKER_USER; None when
    neither is set or it is the supervisor's own (nothing to drop)."""
    name = configured or os.environ.get(WORKER_USER_ENV, "")
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(f"workers.user: no account {name!r} on this host") from None
    if entry.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise StartupError(f"workers.user: running workers as {name!r} needs a supervisor "
                           f"running as root (this one is uid {os.geteuid()})")
    if entry.pw_uid == 0:
        raise StartupError("workers.user: root is what the workers must not run as")
    return WorkerAccount(name, entry.pw_uid, entry.pw_gid)


def worker_cache_dir(runtime_dir: Path) -> Path:
    """$CACHE_DIRECTORY/workers under systemd, else beside the runtime files."""
    cache = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(cache) / "workers" if cache else runtime_dir / "worker-home"


def prepare_for_workers(account: WorkerAccount, runtime_dir: Path, config: Config,
                        discovery_dir: Path | None) -> dict[str, str]:
    """What a worker of another account needs from a root supervisor: to traverse the
    runtime directory, to write discovery records (ours and Dynamo's file discovery), and a
    home and caches of its own. Returns the environment that points the worker at them."""
    try:
        account.let_in(runtime_dir)
        if discovery_dir is not None:
            account.hand_over(discovery_dir, 0o755)
        if config.dynamo.enabled and config.dynamo.discovery_backend == "file" \
                and config.dynamo.file_kv:
            kv = Path(config.dynamo.file_kv)
            kv.mkdir(mode=0o755, parents=True, exist_ok=True)
            account.hand_over(kv, 0o755)
        return account.cache_environment(worker_cache_dir(runtime_dir))
    except OSError as exc:
        raise StartupError(f"workers.user: cannot hand {account.name} what it needs: "
                           f"{exc.strerror or exc} ({getattr(exc, 'filename', '')})") from None
