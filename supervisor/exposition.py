"""The /metrics body, gzipped as Prometheus asks, without compressing the same bytes twice.

A scrape's body has two parts: the workers' series, which stay the very same bytes object
from one scrape to the next while no worker's files changed (worker_series.py), and the
supervisor's own registry, small and new every time. Compressing 600 KiB of eight workers'
text costs about 2 ms of CPU per scrape; so the workers' part is deflated once per change
and kept, ending on a sync flush (byte-aligned, every back-reference inside itself), and each
scrape deflates only the registry after it. The two make one deflate stream and one gzip
member (RFC 1952): any gzip reader takes it. The CRC-32 of the whole goes on from the kept
part's CRC, so the kept bytes are not read again either.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Sequence

# A gzip member's header: magic, deflate, no flags, no mtime, no extra flags, OS unknown.
_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_LEVEL = 1  # Prometheus' bodies are repetitive text: level 1 already shrinks them ~10x


def _deflate(data: bytes, final: bool) -> bytes:
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(
        zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class GzipBody:
    """gzip(kept + fresh) where `kept` is compressed again only when it is not the very
    bytes object of the previous call."""

    def __init__(self) -> None:
        self._kept: tuple[bytes, bytes, int] | None = None  # (object, deflated, CRC-32)
        self._lock = threading.Lock()
        self.deflated_kept = 0  # times the kept part was compressed, for the tests

    def compress(self, parts: Sequence[bytes]) -> bytes:
        """gzip of b"".join(parts); parts[0] is the part worth keeping."""
        kept, fresh = (parts[0], b"".join(parts[1:])) if parts else (b"", b"")
        with self._lock:
            if self._kept is None or self._kept[0] is not kept:
                self._kept = (kept, _deflate(kept, final=False), zlib.crc32(kept))
                self.deflated_kept += 1
            _, deflated, crc = self._kept
        size = len(kept) + len(fresh)
        trailer = struct.pack("<II", zlib.crc32(fresh, crc), size & 0xFFFFFFFF)
        return b"".join((_HEADER, deflated, _deflate(fresh, final=True), trailer))
