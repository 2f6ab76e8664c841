"""Two nodes in one Dynamo deployment: two supervisors (two instances, as two machines would
run them) register their workers in one real etcd, and one Dynamo frontend routes to all four.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    EtcdServer,
    SupervisorProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)
from tests.harness.dynamo import DynamoFrontend, dynamo_env, vllm_counter

pytestmark = pytest.mark.engine


class Fleet:
    def __init__(self, etcd: EtcdServer, nodes: list[SupervisorProcess],
                 frontend: DynamoFrontend):
        self.etcd, self.nodes, self.frontend = etcd, nodes, frontend

    def ports(self) -> list[int]:
        return [w["port"] for node in self.nodes for w in node.status()["workers"]]  # type: ignore[index]


def served(port: int) -> float:
    return vllm_counter(port, "request_success")


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    etcd = EtcdServer(tmp / "etcd", tmp / "etcd.log").start()
    nodes: list[SupervisorProcess] = []
    frontend: DynamoFrontend | None = None
    try:
        for name in ("node-a", "node-b"):
            node_tmp = tmp / name
            node_tmp.mkdir()
            metrics_port, base_port = free_port(), free_port()
            while free_port() == base_port + 1:
                pass
            config = engine_config(
                tiny_model, base_port, workers={"count": 2},
                health={"canary_idle": 30.0}, metrics={"port": metrics_port},
                discovery={"backend": "etcd", "etcd_endpoints": [etcd.url]},
                dynamo={"enabled": True, "discovery_backend": "etcd"})
            # The config's file name is the instance's name: two nodes, two names.
            nodes.append(SupervisorProcess(write_config(node_tmp / f"{name}.toml", config),
                                           node_tmp, metrics_port))
        frontend = DynamoFrontend(tmp / "frontend.log", "round-robin", discovery="etcd",
                                  env=dynamo_env(etcd_url=etcd.url))
        for node in nodes:
            node.wait_workers(lambda ws: len(ws) == 2 and all(
                w["state"] == "serving" for w in ws), 300, "both workers of a node serving")
        frontend.wait_model("tiny", 60)
        yield Fleet(etcd, nodes, frontend)
    finally:
        if frontend is not None:
            frontend.cleanup()
        for node in nodes:
            node.cleanup()
        etcd.stop()


def test_one_frontend_routes_to_every_worker_of_both_nodes(fleet: Fleet) -> None:
    ports = fleet.ports()
    assert len(ports) == 4
    before = {port: served(port) for port in ports}

    def every_worker_served() -> bool:
        httpx.post(fleet.frontend.base + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "fleet", "max_tokens": 2}).raise_for_status()
        return all(served(port) > before[port] for port in ports)
    # Round-robin over four instances, once all four are in the frontend's view.
    wait_for(every_worker_served, 60, interval=0.1, what="requests on all four workers")


def test_a_stopped_node_leaves_the_fleet_and_the_other_serves_on(fleet: Fleet) -> None:
    stopping = fleet.nodes[1]
    stopping.proc.terminate()
    stopping.proc.wait(90)
    survivors = [w["port"] for w in fleet.nodes[0].status()["workers"]]  # type: ignore[index]
    before = {port: served(port) for port in survivors}
    for _ in range(6):
        answer = httpx.post(fleet.frontend.base + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "still here", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
    assert sum(served(port) - before[port] for port in survivors) == 6
