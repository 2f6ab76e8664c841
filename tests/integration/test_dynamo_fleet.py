"""A fleet on one etcd: three supervisors (three instances, as three machines would run them)
publish their records in one real etcd. Nodes a and b register their workers in Dynamo's
discovery in that etcd too: node a's own frontend (a supervised child) routes to all four.
Node c keeps Dynamo's discovery on the node (`[dynamo] discovery_backend = "file"`): its
frontend routes to its worker alone and no other frontend routes to it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.harness import EtcdServer, SupervisorProcess, wait_for, write_config
from tests.harness.dynamo import dynamo_node, vllm_counter

pytestmark = pytest.mark.engine

# A node stopped with SIGTERM takes its workers out of discovery before they drain; the
# frontend watches etcd. What a SIGKILLed node leaves behind lasts a lease (docs/fleet.md).
LEAVE_BOUND_S = 5.0


@dataclass
class Node:
    supervisor: SupervisorProcess
    front: str

    def ports(self) -> list[int]:
        return [w["port"] for w in self.supervisor.status()["workers"]]  # type: ignore[index]


@dataclass
class Fleet:
    etcd: EtcdServer
    a: Node
    b: Node
    solo: Node


def served(port: int) -> float:
    return vllm_counter(port, "request_success")


def complete(front: str, prompt: str) -> None:
    answer = httpx.post(front + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert answer.status_code == 200, answer.text


def instances(front: str, namespace: str) -> int:
    health = httpx.get(front + "/health", timeout=10).json()
    return sum(1 for i in health.get("instances", [])
               if i.get("endpoint") == "generate" and i.get("namespace") == namespace)


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    etcd = EtcdServer(tmp / "etcd", tmp / "etcd.log").start()
    nodes: dict[str, Node] = {}
    plans = {"node-a": (2, "round-robin", False), "node-b": (2, None, False),
             "node-c": (1, "round-robin", True)}
    try:
        for name, (count, router, node_only) in plans.items():
            node_tmp = tmp / name
            node_tmp.mkdir()
            spec = dynamo_node(tiny_model, etcd_url=etcd.url, frontend_router=router,
                               file_kv=node_tmp / "dynamo-kv" if node_only else None,
                               # No canary while a test counts requests.
                               workers={"count": count}, health={"canary_idle": 600.0})
            # The config's file name is the instance's name: three nodes, three names. Nor
            # Dynamo's own canary (its runtime sends idle workers a health request).
            supervisor = SupervisorProcess(write_config(node_tmp / f"{name}.toml", spec.config),
                                           node_tmp, spec.metrics_port,
                                           env={"DYN_HEALTH_CHECK_ENABLED": "false"})
            nodes[name] = Node(supervisor, spec.front if router else "")
        for node in nodes.values():
            # READY (with a frontend: the frontend serves the model) is what systemd waits for.
            wait_for(lambda node=node: (node.supervisor.status() or {}).get("ready"), 300,
                     interval=1.0, what="every node ready")
        yield Fleet(etcd, nodes["node-a"], nodes["node-b"], nodes["node-c"])
    finally:
        for node in nodes.values():
            node.supervisor.cleanup()
        etcd.stop()


def test_one_nodes_frontend_routes_to_every_worker_of_the_fleet(fleet: Fleet) -> None:
    ports = fleet.a.ports() + fleet.b.ports()
    assert len(ports) == 4
    solo = fleet.solo.ports()
    before = {port: served(port) for port in ports + solo}

    def every_worker_served() -> bool:
        complete(fleet.a.front, "fleet")
        return all(served(port) > before[port] for port in ports)
    # Round-robin over four instances, once all four are in the frontend's view.
    wait_for(every_worker_served, 60, interval=0.1, what="requests on all four workers")
    after = {port: served(port) for port in solo}
    assert all(after[port] == before[port] for port in solo), (
        "node a's frontend routed to node c", before, after)


def test_a_node_only_node_serves_only_its_own_frontend(fleet: Fleet) -> None:
    (port,) = fleet.solo.ports()
    others = fleet.a.ports() + fleet.b.ports()
    before = {p: served(p) for p in [port, *others]}
    for _ in range(4):
        complete(fleet.solo.front, "alone")
    assert served(port) - before[port] == 4
    assert all(served(p) == before[p] for p in others)
    assert instances(fleet.solo.front, "dynamo") == 1


def test_a_stopped_node_leaves_the_fleet_within_the_bound(fleet: Fleet) -> None:
    assert instances(fleet.a.front, "dynamo") == 4
    stopping = fleet.b.supervisor
    started = time.monotonic()
    stopping.proc.terminate()
    wait_for(lambda: instances(fleet.a.front, "dynamo") == 2, LEAVE_BOUND_S, interval=0.1,
             what=f"node b's workers out of node a's frontend within {LEAVE_BOUND_S:g} s")
    left = time.monotonic() - started
    stopping.proc.wait(90)
    survivors = fleet.a.ports()
    before = {port: served(port) for port in survivors}
    for _ in range(6):
        complete(fleet.a.front, "still here")
    counted = {port: served(port) - before[port] for port in survivors}
    assert sum(counted.values()) == 6, counted
    print(f"node b out of node a's frontend {left:.2f} s after SIGTERM")
