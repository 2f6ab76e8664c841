"""The gzipped /metrics body: one gzip member that any reader takes, the workers' part
compressed again only when it is another bytes object."""

from __future__ import annotations

import gzip
import zlib

from dynamo_vllm.supervisor.exposition import GzipBody


def _gunzip_one_member(data: bytes) -> bytes:
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = reader.decompress(data) + reader.flush()
    assert reader.eof and not reader.unused_data  # one member, nothing after it
    return out


def test_the_body_is_one_gzip_member_of_every_part() -> None:
    body = GzipBody()
    workers = b"".join(b'vllm:x{worker="%d",le="%d"} %d\n' % (i % 8, i, i) for i in range(5000))
    registry = b"dynamo_agent_node_cpu_cores 2.0\n"
    packed = body.compress([workers, registry, b"# more\n"])
    assert _gunzip_one_member(packed) == workers + registry + b"# more\n"
    assert gzip.decompress(packed) == workers + registry + b"# more\n"
    assert len(packed) < len(workers) / 4


def test_the_kept_part_is_compressed_once_per_object() -> None:
    body = GzipBody()
    workers = b"vllm:y 1.0\n" * 1000
    for n in range(3):
        assert gzip.decompress(body.compress([workers, b"n %d\n" % n])) == workers + b"n %d\n" % n
    assert body.deflated_kept == 1
    changed = b"vllm:y 2.0\n" * 1000  # a worker's files changed: a new object
    assert gzip.decompress(body.compress([changed, b"n\n"])) == changed + b"n\n"
    assert body.deflated_kept == 2


def test_empty_parts() -> None:
    body = GzipBody()
    assert gzip.decompress(body.compress([])) == b""
    assert _gunzip_one_member(body.compress([b"", b""])) == b""
    only = b"only the registry\n"
    assert _gunzip_one_member(body.compress([b"", only])) == only
