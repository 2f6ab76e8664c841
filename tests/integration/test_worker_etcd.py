"""The etcd discovery backend on a real worker and Debian's real etcd.

One worker for the module (engine starts are the expensive part); the SIGKILL test ends it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    EtcdServer,
    EtcdWatch,
    WorkerProcess,
    b64,
    engine_config,
    free_port,
    stream_completion,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.engine

TTL = 3
PREFIX = "/test/instances/"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    tmp = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(tmp / "data", tmp / "etcd.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(tiny_model: Path, etcd: EtcdServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("etcd-worker")
    port = free_port()
    config = engine_config(tiny_model, port,
                           discovery={"backend": "etcd", "etcd_endpoints": [etcd.url],
                                      "etcd_prefix": PREFIX.rstrip("/"), "lease_ttl": TTL},
                           sleep={"inflight": "drain", "drain_timeout": 60.0})
    config["engine"]["max_num_seqs"] = 1  # queued requests make the drain last
    handle = WorkerProcess(write_config(tmp / "tiny.toml", config), port, tmp / "worker.log")
    handle.wait_serving()
    yield handle
    handle.cleanup()


def records(etcd: EtcdServer) -> dict[str, dict]:
    return etcd.get_prefix(PREFIX)[0]


def post(worker: WorkerProcess, path: str, body: object) -> httpx.Response:
    return httpx.post(worker.base + path, json=body, timeout=90)


def test_record_is_published_under_a_lease(worker: WorkerProcess, etcd: EtcdServer) -> None:
    found = wait_for(lambda: records(etcd), 10, what="the worker's key")
    (key, record), = found.items()
    assert key.startswith(PREFIX + "dynamo/backend/generate/")
    assert key.endswith(f"/{record['node']}/tiny/0")
    assert record["port"] == worker.port and record["state"] == "serving"
    assert record["model"] == "tiny" and record["lora_adapters"] == []
    kv = etcd.call("/v3/kv/range", {"key": b64(key)})["kvs"][0]
    lease = int(kv["lease"])
    ttl = etcd.call("/v3/lease/timetolive", {"ID": lease})
    assert 0 < int(ttl["TTL"]) <= TTL


def test_a_lost_lease_is_granted_again(worker: WorkerProcess, etcd: EtcdServer) -> None:
    (key, _), = records(etcd).items()
    lease = int(etcd.call("/v3/kv/range", {"key": b64(key)})["kvs"][0]["lease"])
    etcd.call("/v3/lease/revoke", {"ID": lease})  # deletes the key with it
    assert records(etcd) == {}
    wait_for(lambda: records(etcd), TTL + 5, what="the key put again under a new lease")
    new_lease = int(etcd.call("/v3/kv/range", {"key": b64(key)})["kvs"][0]["lease"])
    assert new_lease != lease


def test_sleep_deletes_the_key_before_the_engine_sleeps(worker: WorkerProcess,
                                                        etcd: EtcdServer) -> None:
    _, revision = etcd.get_prefix(PREFIX)
    results: list[dict] = []
    started = [threading.Event() for _ in range(3)]
    streams = [threading.Thread(target=stream_completion, args=(worker, results, s))
               for s in started]
    with EtcdWatch(etcd, PREFIX, revision + 1) as watch:
        for thread in streams:
            thread.start()
        wait_for(lambda: any(e.is_set() for e in started), 30, interval=0.01, what="a token")
        asked = time.monotonic()
        try:
            reply = post(worker, "/engine/sleep", {"level": 0})
            for thread in streams:
                thread.join(90)
            assert reply.status_code == 200 and reply.json()["status"] == "ok", reply.text
            assert reply.json()["memory_released"] is False
            # By the time the answer came, the key was gone; the worker's own clock says it
            # went before the drain ended, and the drain before the engine paused: no
            # stream was aborted, each ran to its full length.
            assert records(etcd) == {}
            deleted = wait_for(lambda: watch.first("DELETE"), 5, what="the DELETE event")
            assert asked <= deleted
            steps = reply.json()["steps_s"]
            assert steps["unregistered"] <= steps["drained"] <= steps["asleep"], steps
            admitted = [r for r in results if r["status"] == 200]
            assert admitted, results
            assert reply.json()["aborted_requests"] == 0
            assert all(r["finish"] == "length" for r in admitted), results
            assert all(r["status"] in (200, 503) for r in results), results
            health = httpx.get(worker.base + "/health", timeout=10)
            assert health.status_code == 503 and health.json()["state"] == "sleeping"
            again = post(worker, "/engine/sleep", {"level": 0}).json()
            assert again["message"] == "already sleeping"
        finally:
            woke = post(worker, "/engine/wake_up", {})
        assert woke.status_code == 200 and woke.json()["registered"] is True, woke.text
        wait_for(lambda: watch.first("PUT", after=deleted), 5, what="the PUT after wake")
    assert post(worker, "/engine/wake_up", {}).json()["message"] == "already awake"
    (record,) = records(etcd).values()
    assert record["state"] == "serving"
    done = post(worker, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert done.status_code == 200


def test_etcd_outage_keeps_the_worker_serving(worker: WorkerProcess, etcd: EtcdServer) -> None:
    etcd.stop()
    try:
        time.sleep(TTL / 3 + 1.5)  # at least one keepalive fails
        served = post(worker, "/v1/completions", {"model": "tiny", "prompt": "hi",
                                                  "max_tokens": 3})
        assert served.status_code == 200
        assert httpx.get(worker.base + "/health", timeout=10).status_code == 200
        metrics = httpx.get(worker.base + "/metrics", timeout=10).text
        errors = [line for line in metrics.splitlines()
                  if line.startswith("dynamo_component_discovery_errors_total")]
        assert errors and any(float(line.rsplit(" ", 1)[1]) >= 1 for line in errors), errors
    finally:
        etcd.start()
    wait_for(lambda: records(etcd), TTL + 10, what="the key after etcd came back")
    assert "etcd keepalive failed" in worker.log()


def test_sigkilled_worker_key_expires_within_the_ttl(worker: WorkerProcess,
                                                     etcd: EtcdServer) -> None:
    _, revision = etcd.get_prefix(PREFIX)
    (key, _), = records(etcd).items()
    lease = int(etcd.call("/v3/kv/range", {"key": b64(key)})["kvs"][0]["lease"])
    with EtcdWatch(etcd, PREFIX, revision + 1) as watch:
        left = int(etcd.call("/v3/lease/timetolive", {"ID": lease})["TTL"])
        killed = time.monotonic()
        worker.proc.send_signal(signal.SIGKILL)
        deleted = wait_for(lambda: watch.first("DELETE"), TTL + 5, interval=0.05,
                           what="the DELETE on lease expiry")
    # Gone when the lease runs out: what was left of it at the kill (TimeToLive rounds
    # down: +1), plus etcd's 0.5 s expiry check, plus slack for a loaded 2-core machine.
    assert deleted - killed <= left + 1 + 0.5 + 1.0, (left, deleted - killed)
    assert records(etcd) == {}
