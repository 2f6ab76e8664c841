"""A worker's metric directory removed under it (a tmpfiles clean-up, an operator's rm -rf).

prometheus_client opens each file once per process and writes through a shared mapping, so
the worker goes on counting into files that no longer have a name, and the supervisor
would export nothing for it until its next life. The supervisor puts the directory back
and, for each file the worker's tree still holds open, a symlink to it through
/proc/PID/fd: the series come back whole (no counter reset), and files the worker creates
later land in the directory as usual. The directory is removed when the life ends, so the
links never outlive the processes they point into.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from dynamo_vllm.supervisor.shm import fd_targets

DELETED = " (deleted)"
# A checkpoint taken after the directory was removed brings the files back removed, under
# the name CRIU restored them by: a ghost file ("%s.cr.%x.ghost") or, where CRIU could link
# the unlinked file at the dump, a link-remap file ("%s.cr_link"; seen in the long soak: a
# restored worker's series stopped for good after the next removal, 0 files relinked).
CRIU_RENAMED = re.compile(r"(\.cr\.[0-9a-f]+\.ghost|\.cr_link)$")


def held_deleted(pids: list[int], directory: Path) -> dict[str, str]:
    """{file name: /proc/PID/fd/N} for the metric files of `directory` that these processes
    still hold open after they were unlinked."""
    prefix = str(directory) + "/"
    found: dict[str, str] = {}
    for fd_path, link in fd_targets(pids):
        if not link.endswith(DELETED):
            continue
        path = CRIU_RENAMED.sub("", link[: -len(DELETED)])
        name = path.removeprefix(prefix)
        if name != path and "/" not in name and name.endswith(".db"):
            found.setdefault(name, fd_path)
    return found


def restore_directory(directory: Path, pids: list[int]) -> int:
    """Make `directory` again (0700) and link into it the files the processes hold;
    returns how many were linked."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    linked = 0
    for name, target in held_deleted(pids, directory).items():
        with contextlib.suppress(FileExistsError):
            os.symlink(target, directory / name)
            linked += 1
    return linked
