"""The workers' part of /metrics: real prometheus_client multiprocess files, merged,
labelled, joined across workers, and rendered again only for a worker whose files changed."""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from dynamo_vllm.supervisor.metrics import GuardedCollectors, Scrape
from dynamo_vllm.supervisor.worker_series import WorkerSeries, WorkerText, _Families, files_content

REQUESTS = mmap_key("vllm:requests", "vllm:requests_total", ["finished_reason"], ["stop"],
                    "Finished requests.")
BUCKET = mmap_key("vllm:ttft_seconds", "vllm:ttft_seconds_bucket", ["le"], ["0.1"], "TTFT.")
OVER = mmap_key("vllm:ttft_seconds", "vllm:ttft_seconds_bucket", ["le"], ["+Inf"], "TTFT.")
TTFT_SUM = mmap_key("vllm:ttft_seconds", "vllm:ttft_seconds_sum", [], [], "TTFT.")


def _write(path: Path, values: dict[str, float]) -> None:
    mapped = MmapedDict(str(path))
    try:
        for key, value in values.items():
            mapped.write_value(key, value, 0.0)
    finally:
        mapped.close()


def _worker_dir(root: Path, name: str, requests: float) -> str:
    directory = root / name
    directory.mkdir()
    # Two processes of one worker (API server and EngineCore) count into their own files.
    _write(directory / "counter_100.db", {REQUESTS: requests})
    _write(directory / "counter_101.db", {REQUESTS: 1.0})
    _write(directory / "histogram_100.db", {BUCKET: 2.0, OVER: 1.0, TTFT_SUM: 0.25})
    return str(directory)


def _samples(text: bytes) -> dict[tuple[str, str, str], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("worker", ""), sample.labels.get("le", ""))
            found[key] = sample.value
    return found


def test_workers_join_under_one_family_and_only_a_changed_worker_renders_again(
        tmp_path: Path) -> None:
    dirs = {"worker0": _worker_dir(tmp_path, "w0", 4.0),
            "worker1": _worker_dir(tmp_path, "w1", 9.0)}
    labels = {"model": "tiny"}
    series = WorkerSeries(lambda: dict(dirs), lambda: dict(labels))
    first = series.render()
    assert first.count(b"# TYPE vllm:requests_total counter") == 1
    assert first.count(b"# TYPE vllm:ttft_seconds histogram") == 1
    samples = _samples(first)
    # The worker's two processes are summed; the histogram is cumulative.
    assert samples[("vllm:requests_total", "worker0", "")] == 5.0
    assert samples[("vllm:requests_total", "worker1", "")] == 10.0
    assert samples[("vllm:ttft_seconds_bucket", "worker0", "+Inf")] == 3.0
    assert samples[("vllm:ttft_seconds_count", "worker1", "")] == 3.0
    assert b'model="tiny"' in first and series.renders == 2

    # Nothing changed: each worker's text kept, and the joined text is the same object.
    assert series.render() is first and series.renders == 2

    _write(Path(dirs["worker1"]) / "counter_100.db", {REQUESTS: 20.0})
    changed = _samples(series.render())
    assert changed[("vllm:requests_total", "worker1", "")] == 21.0
    assert changed[("vllm:requests_total", "worker0", "")] == 5.0
    assert series.renders == 3  # worker1 only

    labels["rack"] = "r1"  # the labels changed (a reload): every worker again
    assert b'rack="r1"' in series.render() and series.renders == 5


def test_a_worker_gone_or_removed_under_the_scrape_costs_only_its_series(
        tmp_path: Path) -> None:
    dirs = {"worker0": _worker_dir(tmp_path, "w0", 1.0),
            "worker1": _worker_dir(tmp_path, "w1", 2.0),
            "worker2": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    series = WorkerSeries(lambda: dict(dirs))
    assert set(k[1] for k in _samples(series.render())) == {"worker0", "worker1"}
    shutil.rmtree(dirs["worker1"])  # an operator's rm -rf, before the supervisor sees it
    assert set(k[1] for k in _samples(series.render())) == {"worker0"}
    del dirs["worker0"]  # the life ended
    assert series.render() == b""
    assert set(series._rendered) == {"worker1", "worker2"}  # nothing kept for worker0


def test_a_failing_worker_part_is_reported_and_the_scrape_still_answers() -> None:
    registry = CollectorRegistry()

    def broken() -> bytes:
        raise OSError("no")

    def broken_node() -> list:
        raise OSError("no /proc")

    guarded = GuardedCollectors({"node": broken_node}, outside=["workers"])
    registry.register(guarded)
    text = b"".join(Scrape(registry, guarded, broken)()).decode()
    assert 'dynamo_agent_scrape_collector_success{collector="workers"} 0.0' in text
    assert 'dynamo_agent_collector_errors_total{collector="workers"} 1.0' in text
    assert 'dynamo_agent_scrape_collector_success{collector="node"} 0.0' in text
    assert 'dynamo_agent_collector_errors_total{collector="node"} 1.0' in text
    text = b"".join(Scrape(registry, guarded, lambda: b"")()).decode()
    assert 'dynamo_agent_scrape_collector_success{collector="workers"} 1.0' in text


def test_the_reader_merges_as_prometheus_clients_own(tmp_path: Path) -> None:
    """Every file kind vLLM's processes write, read from the bytes the scrape compared and
    merged: the same families and values as MultiProcessCollector.merge of the files."""
    def gauge(name: str) -> str:
        return mmap_key(name, name, ["engine"], ["0"], "A gauge.")

    _write(tmp_path / "counter_100.db", {REQUESTS: 3.0})
    _write(tmp_path / "counter_101.db", {REQUESTS: 4.0})
    _write(tmp_path / "histogram_100.db", {BUCKET: 2.0, OVER: 1.0, TTFT_SUM: 0.25})
    _write(tmp_path / "histogram_101.db", {BUCKET: 1.0, TTFT_SUM: 0.5})
    _write(tmp_path / "gauge_livesum_100.db", {gauge("vllm:running"): 2.0})
    _write(tmp_path / "gauge_livesum_101.db", {gauge("vllm:running"): 3.0})
    _write(tmp_path / "gauge_all_100.db", {gauge("vllm:cache_info"): 1.0})
    mostrecent = MmapedDict(str(tmp_path / "gauge_mostrecent_100.db"))
    mostrecent.write_value(gauge("vllm:kv_usage"), 0.5, 10.0)
    mostrecent.close()
    files = sorted(str(path) for path in tmp_path.glob("*.db"))
    text = WorkerText("0", {})
    ours = text._read(files_content(files))
    # Twice: the second read comes from the kept keys.
    ours = text._read(files_content(files))
    merged = MultiProcessCollector._accumulate_metrics(ours, True)
    theirs = MultiProcessCollector.merge(files, accumulate=True)
    assert generate_latest(_Families(list(merged))) == \
        generate_latest(_Families(list(theirs)))
    assert len(text.keys) == 7  # one parse per distinct series key
