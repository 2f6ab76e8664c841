"""A TCP relay that can be cut: one node's way to etcd, partitioned on demand.

Every connection to `port` is relayed to the target. `cut()` stops relaying in both
directions without closing anything (bytes wait in the kernel's buffers, new connections are
accepted and left waiting), which is what a node sees when the network between it and etcd
drops packets: no error, no answer. `heal()` relays again. One thread per direction of each
connection; daemon threads, so a test that forgets `close()` still exits.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

CHUNK = 65536
POLL_S = 0.05


class CuttableRelay:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._listener.settimeout(POLL_S)
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True,
                             name="relay-connect").start()

    def _connect(self, client: socket.socket) -> None:
        self._wait_open()
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.settimeout(None)  # blocking: select() paces the reads
        with self._lock:
            self._sockets += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True,
                             name="relay-pump").start()

    def _wait_open(self) -> None:
        while not self._open.wait(POLL_S) and not self._closed.is_set():
            pass

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while not self._closed.is_set():
            self._wait_open()
            try:
                readable, _, _ = select.select([source], [], [], POLL_S)
                if not readable:
                    continue
                data = source.recv(CHUNK)
            except OSError:
                break
            if not data:
                break
            self._wait_open()  # a cut between the read and the write holds the bytes too
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
