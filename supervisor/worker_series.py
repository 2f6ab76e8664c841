"""Every live worker's `vllm:*` and `dynamo_component_*` series, as exposition text.

A worker's processes write prometheus_client's multiprocess files into the worker's own
directory (fresh for each life). A scrape merges each directory
(`MultiProcessCollector.merge`), adds the `worker` label and the workers' labels (Dynamo's
hierarchy and the operator's) where a series lacks them, as vLLM's own do, and renders the
text. Merging and rendering cost about 5 ms per worker on a 2-core machine, and a worker with
no traffic writes nothing between two scrapes: so each worker's text is kept with a digest of
its files' used bytes and of the labels, and made again only when one of them changed.
Families of the same name from several workers are joined under one HELP and TYPE, as the
text format requires, so the exposition has no duplicate series.
"""

from __future__ import annotations

import glob
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterable
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
    digest: bytes
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


def files_digest(files: list[str], labels: dict[str, str]) -> bytes:
    """A digest of what a worker's series would render from: its files' used bytes (in name
    order) and the labels added to them. Raises FileNotFoundError when a file went away."""
    digest = hashlib.blake2b(repr(sorted(labels.items())).encode(), digest_size=16)
    for path in files:
        data = _used_bytes(path)
        digest.update(b"%s\0%d\0" % (os.path.basename(path).encode(), len(data)))
        digest.update(data)
    return digest.digest()


class WorkerText:
    """One worker's merged families as text, labelled. A series' text up to its value (name,
    labels sorted and escaped by prometheus_client's own generate_latest) is made the first
    time the series is seen and kept: a busy worker's files change at every step, but its
    series stay the same ones."""

    def __init__(self, worker: str, common: dict[str, str]):
        self.labels = {**common, Label.WORKER: worker}
        self.prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self.headers: dict[tuple[str, str, str], bytes] = {}

    def render(self, files: list[str]) -> list[_Family]:
        if len(self.prefixes) > MAX_KEPT_SERIES:
            self.prefixes.clear()  # series seen over many lives (LoRA adapters come and go)
        return [self._family(merged)
                for merged in MultiProcessCollector.merge(files, accumulate=True)]

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
        # Scrapes run in a small pool; the cache is one.
        self._lock = threading.Lock()
        self.renders = 0  # workers rendered again (a cache miss), for the benchmark

    def render(self) -> bytes:
        with self._lock:
            return self._render()

    def _render(self) -> bytes:
        common = self.labels()
        live = self.directories()
        joined: dict[str, list[bytes]] = {}
        for worker, directory in sorted(live.items()):
            rendered = self._worker(worker, directory, common)
            for family in rendered.families if rendered else ():
                parts = joined.get(family.name)
                if parts is None:
                    joined[family.name] = parts = [family.header]
                parts.append(family.samples)
        for gone in self._rendered.keys() - live.keys():
            del self._rendered[gone]
        return b"".join(b"".join(parts) for parts in joined.values())

    def _worker(self, worker: str, directory: str, common: dict[str, str]) -> _Rendered | None:
        files = sorted(glob.glob(os.path.join(directory, "*.db")))
        try:
            digest = files_digest(files, common)
            kept = self._rendered.get(worker)
            if kept is not None and kept.digest == digest:
                return kept
            text = kept.text if kept is not None and kept.text.labels == {
                **common, Label.WORKER: worker} else WorkerText(worker, common)
            # Read again after the digest: a value written in between shows in the next
            # scrape, whose digest differs from the one kept here.
            rendered = _Rendered(digest, text.render(files), text)
        except FileNotFoundError:
            # The life ended (or its directory was removed) between the listing and the
            # read: its series are missing from this one scrape, not the others'.
            self._rendered.pop(worker, None)
            return None
        self.renders += 1
        self._rendered[worker] = rendered
        return rendered
