"""Test-wide settings: nothing a test starts talks to anything but this machine."""

from __future__ import annotations

import os

# Set before anything imports vLLM; every subprocess inherits them.
for _name, _value in {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ[_name] = _value
os.environ.pop("NOTIFY_SOCKET", None)
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
