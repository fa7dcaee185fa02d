"""A TCP proxy for fault tests: a stable address whose backend can be switched (a failover
behind a virtual IP) and whose traffic can be dropped (a replication link that lags)."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    """Forwards 127.0.0.1:<port> to a backend; ``switch`` moves it, ``drop`` blackholes it."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.dropping = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.backend, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.dropping:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every connection through the proxy (clients see their server go away)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def switch(self, backend: tuple[str, int]) -> None:
        """New connections go to ``backend``; existing ones are closed."""
        self.backend = backend
        self.dropping = False
        self.cut()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
