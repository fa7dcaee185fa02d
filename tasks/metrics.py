"""Prometheus metrics in the text exposition format: a small registry, its HTTP server, and
the worker's metrics (the driver's are in ``orchestrator/metrics.py``).

Written here rather than with ``prometheus_client``: its import took ~50 ms (a resume's
whole fixed cost is ~0.3 s), and its updates cost 2-3 times these (docs/metrics.md). Everything is
counted per batch or per chunk of lines, never per event, and only by the process's one
working thread; the server's thread reads the values. A histogram keeps per-bucket counts
and derives ``_count`` from them, so a scrape never sees ``+Inf`` and ``_count`` differ.

Off unless a port is given: a process that serves none counts nothing (``WORKER`` stays
None), runs no thread for it and never imports ``http.server``.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
EVENTS_BUCKETS = (1, 10, 100, 1_000, 2_500, 5_000, 10_000, 20_000, 50_000, 100_000)

Labels = tuple[str, ...]


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric:
    """One metric family: a name, its help text, its label names; values per label values."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[Labels, float] = {}

    def samples(self) -> list[str]:
        """The family's sample lines."""
        return [
            f"{self.name}{_label_text(self.labels, key)} {_number(value)}"
            for key, value in sorted(self.values.items())
        ]


class Counter(Metric):
    """A count that only goes up (``_total``), for the life of the process."""

    kind = "counter"

    def inc(self, amount: float = 1, labels: Labels = ()) -> None:
        """Add ``amount`` (>= 0) to the count of ``labels``."""
        self.values[labels] = self.values.get(labels, 0) + amount

    def touch(self, labels: Labels = ()) -> None:
        """Show the count of ``labels`` as 0 before anything is counted (a known series)."""
        self.values.setdefault(labels, 0)


class Gauge(Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, labels: Labels = ()) -> None:
        """Set the value of ``labels``."""
        self.values[labels] = value


class Histogram(Metric):
    """Observations counted in buckets (upper bounds), with their sum."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help, labels)
        self.bounds = tuple(sorted(buckets))
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, value: float, labels: Labels = ()) -> None:
        """Count one observation of ``value``."""
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.bounds) + 1)
        # sum first: a scrape in between sees a count one short, never an orphan sum share
        self.sums[labels] = self.sums.get(labels, 0.0) + value
        counts[bisect_left(self.bounds, value)] += 1

    def samples(self) -> list[str]:
        lines = []
        for key in sorted(self.counts):
            counts = list(self.counts[key])  # a copy: the working thread goes on counting
            total = 0
            for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                total += n
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_label_text(self.labels, key, le)} {total}")
            labels = _label_text(self.labels, key)
            lines.append(f"{self.name}_sum{labels} {_number(self.sums.get(key, 0.0))}")
            lines.append(f"{self.name}_count{labels} {total}")
        return lines


class Registry:
    """The metrics a process serves, and callbacks that refresh some of them at each scrape."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self.collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add(self, metric: Metric) -> Metric:
        """Register ``metric`` (names are unique)."""
        assert all(m.name != metric.name for m in self.metrics), metric.name
        self.metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """A new counter of this registry."""
        metric = Counter(name, help, labels)
        self.add(metric)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """A new gauge of this registry."""
        metric = Gauge(name, help, labels)
        self.add(metric)
        return metric

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> Histogram:
        """A new histogram of this registry."""
        metric = Histogram(name, help, labels, buckets=buckets)
        self.add(metric)
        return metric

    def names(self) -> list[str]:
        """The names of every metric family."""
        return [m.name for m in self.metrics]

    def render(self) -> bytes:
        """Every metric in the text exposition format (version 0.0.4)."""
        with self._lock:  # (two scrapes at once run the collectors one after the other)
            for collect in self.collectors:
                collect()
            lines = []
            for m in self.metrics:
                lines.append(f"# HELP {m.name} {m.help.replace(chr(92), chr(92) * 2)}")
                lines.append(f"# TYPE {m.name} {m.kind}")
                lines.extend(m.samples())
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Address:
    """Where metrics are served: a host (an IP address or a name) and a TCP port."""

    host: str
    port: int

    def offset(self, n: int) -> Address:
        """The same host, ``n`` ports further."""
        return Address(self.host, self.port + n)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``PORT`` (on 127.0.0.1) or ``HOST:PORT`` (``[::1]:PORT`` for IPv6).

    Raises:
        ValueError: not a port from 1 to 65535, or no host before the colon.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    if sep and not host:
        msg = f"no host before ':' in {text!r}"
        raise ValueError(msg)
    if not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"not a TCP port (1 to 65535): {port!r}"
        raise ValueError(msg)
    return Address(host, int(port))


class PortInUse(OSError):
    """Raised when the metrics address cannot be bound (in use, not allowed, not local)."""


def bind(address: Address) -> socket.socket:
    """A listening socket on ``address``.

    Raises:
        PortInUse: the port is taken, or the host is not one of this machine's.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, where = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        msg = f"cannot serve metrics on {address}: {e.strerror or e}"
        raise PortInUse(msg) from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(16)
    except OSError as e:
        sock.close()
        msg = f"cannot serve metrics on {address}: {e.strerror or e}"
        raise PortInUse(msg) from e
    return sock


class MetricsServer:
    """Serves a registry at ``GET /metrics`` from a daemon thread, on a socket bound early.

    Binding comes first (so that a port in use stops a command before it starts
    anything) and serving later: a command that forks its workers must run no
    other thread at the fork. One request at a time (a scrape takes well under a
    millisecond); the thread blocks in ``accept`` and ends when the socket is shut
    down, so stopping costs nothing (``http.server``'s loop polls every 0.5 s, and
    its shutdown waited for that).
    """

    def __init__(self, registry: Registry, address: Address) -> None:
        self.registry, self.address = registry, address
        self.sock: socket.socket | None = bind(address)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve from a daemon thread (once)."""
        if self._thread is not None or self.sock is None:
            return
        import http.server  # (only in processes that serve metrics)

        registry = self.registry

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # seconds a client may take to send its request

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not news

        sock = self.sock

        def serve() -> None:
            while True:
                try:
                    conn, peer = sock.accept()
                except OSError:
                    return  # shut down
                try:
                    # (a handler keeps its "server" only as an attribute: no socketserver here)
                    Handler(conn, peer, self)  # type: ignore[arg-type]
                except OSError:
                    pass  # the client went away
                finally:
                    conn.close()

        self._thread = threading.Thread(target=serve, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # (wakes the thread in accept)
            sock.close()

    def close_in_child(self) -> None:
        """In a forked child: let go of the parent's listening socket (never served here)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class WorkerMetrics:
    """What a worker process counts: its batches, events applied, time spent, failures."""

    def __init__(self) -> None:
        reg = self.registry = Registry()
        ns = ("namespace",)
        self.batches = reg.counter(
            "orchestrator_worker_batches_total",
            "Batch jobs this worker ran, by outcome (committed, duplicate, stale, gone).",
            ("namespace", "outcome"),
        )
        self.events = reg.counter(
            "orchestrator_worker_events_applied_total",
            "Events of the batches this worker committed (the flow's rejections included).",
            ns,
        )
        self.rejected = reg.counter(
            "orchestrator_worker_events_rejected_total",
            "Events the flow rejected (raised, timed out, killed its worker) in committed batches.",
            ns,
        )
        self.failures = reg.counter(
            "orchestrator_worker_failures_total",
            "Batch jobs that raised in this worker (the job ends FAILED in RQ).",
            ns,
        )
        self.apply_seconds = reg.histogram(
            "orchestrator_worker_apply_duration_seconds",
            "Time to load, apply and commit one batch (its job's run).",
            ns,
            buckets=SECONDS_BUCKETS,
        )
        self.commit_seconds = reg.histogram(
            "orchestrator_worker_commit_duration_seconds",
            "Time of a batch's commit (the MULTI/EXEC of its states, undo record and notice).",
            ns,
            buckets=SECONDS_BUCKETS,
        )
        self.reconnects = reg.counter(
            "orchestrator_redis_reconnects_total",
            "Times this process got Redis back after losing it.",
        )


# The worker's metrics, in a process that serves them (``serve_worker_metrics``); else None.
WORKER: WorkerMetrics | None = None


def serve_worker_metrics(
    address: Address, reconnects: Callable[[], int] | None = None
) -> MetricsServer:
    """Count and serve this worker process's metrics on ``address``.

    Raises:
        PortInUse: the address cannot be bound.
    """
    global WORKER
    metrics = WorkerMetrics()
    if reconnects is not None:
        count = reconnects
        metrics.registry.collectors.append(lambda: metrics.reconnects.values.update({(): count()}))
    metrics.reconnects.touch()
    server = MetricsServer(metrics.registry, address)
    WORKER = metrics
    server.start()
    return server
