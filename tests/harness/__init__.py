"""The tests' harness: real processes (workers, supervisors, etcd) started, watched and
cleaned up with bounded waits, and the helpers around them.

- `basics`: free ports, `wait_for`, configs on disk, a child that holds files open;
- `processes`: WorkerProcess, SupervisorProcess (with a real NOTIFY_SOCKET), their trees;
- `streams`: the SSE payloads of a streaming response (the project's one decoder,
  `dynamo_vllm.bench.sse`), a stream run in a thread;
- `etcd`: a real etcd on loopback and a watch on its keys;
- `fuzz`: schema fuzzing of a server's routes from its OpenAPI document.

Benchmarks use it too (`python -m benchmarks.NAME`).
"""

from __future__ import annotations

from dynamo_vllm.contract.discovery.etcd_gateway import prefix_end
from tests.harness.basics import (
    ROOT,
    FakeClock,
    child_holding,
    closed_by_peer,
    engine_config,
    free_port,
    wait_for,
    write_config,
)
from tests.harness.etcd import EtcdServer, EtcdWatch, b64, low_free_port
from tests.harness.fuzz import fuzz_openapi
from tests.harness.processes import NotifySocket, ProcessTree, SupervisorProcess, WorkerProcess
from tests.harness.streams import SteadyStreams, sse_data, stream_completion

__all__ = [
    "ROOT",
    "EtcdServer",
    "EtcdWatch",
    "FakeClock",
    "NotifySocket",
    "ProcessTree",
    "SteadyStreams",
    "SupervisorProcess",
    "WorkerProcess",
    "b64",
    "child_holding",
    "closed_by_peer",
    "engine_config",
    "free_port",
    "fuzz_openapi",
    "low_free_port",
    "prefix_end",
    "sse_data",
    "stream_completion",
    "wait_for",
    "write_config",
]
