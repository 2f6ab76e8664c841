"""Every live worker's `vllm:*` and `dynamo_component_*` series, as exposition text.

A worker's processes write prometheus_client's multiprocess files into the worker's own
directory (fresh for each life). A scrape merges each directory (as
`MultiProcessCollector.merge` does, from the bytes it read, with each series' JSON key parsed
once per worker instead of once per scrape: that parse was a third of a changed worker's
cost), adds the `worker` label and the workers' labels (Dynamo's
hierarchy and the operator's) where a series lacks them, as vLLM's own do, and renders the
text. Merging and rendering cost about 5 ms per worker on a 2-core machine, and a worker with
no traffic writes nothing between two scrapes: so each worker's text is kept with its files'
used bytes and the labels, and made again only when one of them changed.
Families of the same name from several workers are joined under one HELP and TYPE, as the
text format requires, so the exposition has no duplicate series; when no worker changed, the
joined text is the very bytes object of the last scrape (the gzip of /metrics keeps its
compressed form by that identity, exposition.py).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from dynamo_vllm.contract.protocol import Label

# prometheus_client's files start with how many of their bytes are in use (a 32-bit int)
# and are preallocated beyond that: only the used part says whether a value changed.
_USED = struct.Struct("i")
_VALUE = struct.Struct("dd")
_HEAD = 4096
# A worker's series whose text is kept; a tiny model's worker has about 400.
MAX_KEPT_SERIES = 20_000


@dataclass(frozen=True)
class _Family:
    name: str
    header: bytes  # "# HELP ...\n# TYPE ...\n", once per family in the exposition
    samples: bytes


@dataclass(frozen=True)
class _Rendered:
    # What the text was made from: the files' names and used bytes, and the labels. Kept
    # whole and compared (a memcmp), which costs less than hashing them at every scrape.
    source: tuple[tuple[str, bytes], ...]
    labels: dict[str, str]
    families: list[_Family]
    text: WorkerText


class _Families:
    """The minimal collector generate_latest renders."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def _used_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        head = file.read(_HEAD)
        used = _USED.unpack_from(head)[0] if len(head) >= _USED.size else 0
        if used <= len(head):
            return head[:used]
        return head + file.read(used - len(head))


def _entries(data: bytes) -> Iterator[tuple[bytes, float, float]]:
    """(key, value, timestamp) of each entry in a file's used bytes, in the layout
    prometheus_client's MmapedDict documents: after 8 bytes of head, a 4-byte key length,
    the JSON key padded to 8 bytes, then value and timestamp as two doubles."""
    pos, used = 8, len(data)
    while pos < used:
        length = _USED.unpack_from(data, pos)[0]
        if pos + 4 + length > used:
            raise RuntimeError("read beyond a metric file's used bytes: corrupted")
        key = data[pos + 4:pos + 4 + length]
        pos += 4 + length + (8 - (length + 4) % 8)
        value, timestamp = _VALUE.unpack_from(data, pos)
        yield key, value, timestamp
        pos += 16


def files_content(files: list[str]) -> tuple[tuple[str, bytes], ...]:
    """What a worker's series would render from: each file's name and used bytes, in name
    order. Raises FileNotFoundError when a file went away."""
    return tuple((path, _used_bytes(path)) for path in files)


class WorkerText:
    """One worker's merged families as text, labelled. A series' text up to its value (name,
    labels sorted and escaped by prometheus_client's own generate_latest) is made the first
    time the series is seen and kept: a busy worker's files change at every step, but its
    series stay the same ones."""

    def __init__(self, worker: str, common: dict[str, str]):
        self.labels = {**common, Label.WORKER: worker}
        self.prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self.headers: dict[tuple[str, str, str], bytes] = {}
        self.keys: dict[bytes, tuple[str, str, tuple[tuple[str, str], ...], str]] = {}

    def render(self, source: tuple[tuple[str, bytes], ...]) -> list[_Family]:
        if len(self.prefixes) > MAX_KEPT_SERIES or len(self.keys) > MAX_KEPT_SERIES:
            # Series seen over many lives (LoRA adapters come and go).
            self.prefixes.clear()
            self.keys.clear()
        # prometheus_client's own accumulation (sums across processes, cumulative buckets,
        # the gauges' multiprocess modes), on what _read gathered as its reader would.
        merged = MultiProcessCollector._accumulate_metrics(self._read(source), True)
        return [self._family(metric) for metric in merged]

    def _read(self, source: tuple[tuple[str, bytes], ...]) -> dict[str, Metric]:
        """`MultiProcessCollector._read_metrics`, from bytes already read, keys kept."""
        metrics: dict[str, Metric] = {}
        for path, data in source:
            parts = os.path.basename(path).split("_")
            kind = parts[0]
            for key, value, timestamp in _entries(data):
                parsed = self.keys.get(key)
                if parsed is None:
                    metric_name, name, labels, help_text = json.loads(key)
                    parsed = self.keys[key] = (metric_name, name,
                                               tuple(sorted(labels.items())), help_text)
                metric_name, name, labels_key, help_text = parsed
                metric = metrics.get(metric_name)
                if metric is None:
                    metric = metrics[metric_name] = Metric(metric_name, help_text, kind)
                # Labels as sorted pairs, as prometheus_client's reader hands them to its
                # accumulation (which makes them dicts).
                if kind == "gauge":
                    # gauge_MODE_PID.db: the mode decides how processes combine.
                    metric._multiprocess_mode = parts[1]  # type: ignore[attr-defined]
                    with_pid = (*labels_key, ("pid", parts[2][:-3]))
                    metric.add_sample(name, with_pid, value, timestamp)  # type: ignore[arg-type]
                else:
                    metric.add_sample(name, labels_key, value)  # type: ignore[arg-type]
        return metrics

    def _family(self, merged: Metric) -> _Family:
        head = (merged.name, merged.documentation, merged.type)
        header = self.headers.get(head)
        if header is None:
            header = self.headers[head] = generate_latest(_Families([self._metric(merged)]))
        lines = []
        for sample in merged.samples:
            series = (sample.name, tuple(sample.labels.items()))
            prefix = self.prefixes.get(series)
            if prefix is None:
                prefix = self.prefixes[series] = self._prefix(merged, sample)
            lines.append(f"{prefix}{floatToGoString(sample.value)}\n")
        return _Family(merged.name, header, "".join(lines).encode())

    def _metric(self, merged: Metric) -> Metric:
        return Metric(merged.name, merged.documentation, merged.type, merged.unit)

    def _prefix(self, merged: Metric, sample: Sample) -> str:
        metric = self._metric(merged)
        # Multiprocess samples carry no timestamp; the operator's labels never replace
        # a series' own.
        metric.samples = [sample._replace(labels={**self.labels, **sample.labels,
                                                  Label.WORKER: self.labels[Label.WORKER]},
                                          value=0.0, timestamp=None)]
        line = generate_latest(_Families([metric])).decode().splitlines()[-1]
        return line[: line.rindex(" ") + 1]


class WorkerSeries:
    """The workers' part of the supervisor's /metrics: `directories()` gives each live
    worker's metric directory, `labels()` the labels every worker series carries."""

    def __init__(self, directories: Callable[[], dict[str, str]],
                 labels: Callable[[], dict[str, str]] = dict):
        self.directories = directories
        self.labels = labels
        self._rendered: dict[str, _Rendered] = {}
        # The last joined text, and the rendered workers it was joined from (held, so that
        # the identity comparison below cannot meet a new object at a freed one's address).
        self._joined: tuple[list[tuple[str, _Rendered]], bytes] = ([], b"")
        # Scrapes run in a small pool; the cache is one.
        self._lock = threading.Lock()
        self.renders = 0  # workers rendered again (a cache miss), for the benchmark

    def render(self) -> bytes:
        with self._lock:
            return self._render()

    def _render(self) -> bytes:
        common = self.labels()
        live = self.directories()
        renders = [(worker, self._worker(worker, directory, common))
                   for worker, directory in sorted(live.items())]
        for gone in self._rendered.keys() - live.keys():
            del self._rendered[gone]
        # The same rendered objects as last time (kept ones are reused): the same text.
        used = [(worker, rendered) for worker, rendered in renders if rendered]
        last = self._joined[0]
        if len(used) == len(last) and all(w == lw and r is lr
                                           for (w, r), (lw, lr) in zip(used, last, strict=True)):
            return self._joined[1]
        joined: dict[str, list[bytes]] = {}
        for _, rendered in used:
            for family in rendered.families:
                parts = joined.get(family.name)
                if parts is None:
                    joined[family.name] = parts = [family.header]
                parts.append(family.samples)
        text = b"".join(b"".join(parts) for parts in joined.values())
        self._joined = (used, text)
        return text

    def _worker(self, worker: str, directory: str, common: dict[str, str]) -> _Rendered | None:
        files = sorted(glob.glob(os.path.join(directory, "*.db")))
        try:
            source = files_content(files)
            kept = self._rendered.get(worker)
            if kept is not None and kept.source == source and kept.labels == common:
                return kept
            text = kept.text if kept is not None and kept.text.labels == {
                **common, Label.WORKER: worker} else WorkerText(worker, common)
            # Rendered from the very bytes compared: a value written since shows in the next
            # scrape, whose content differs from the one kept here.
            rendered = _Rendered(source, dict(common), text.render(source), text)
        except FileNotFoundError:
            # The life ended (or its directory was removed) between the listing and the
            # read: its series are missing from this one scrape, not the others'.
            self._rendered.pop(worker, None)
            return None
        self.renders += 1
        self._rendered[worker] = rendered
        return rendered
