"""The driver's Prometheus metrics (``--metrics-port``), and the ports of a command's workers.

The driver serves on the address given; the worker processes the command starts serve
on the next ports, worker i (from 0) on PORT + 1 + i. Every metric is listed in
docs/metrics.md. The driver counts per batch, and its own counts and the gauges are
published from its loop at most every PUBLISH_EVERY seconds, so a scrape (from the
server's thread) reads plain values and never the driver's changing structures.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, ClassVar

from tasks.errors import ExitStatus, PipelineError
from tasks.metrics import (
    EVENTS_BUCKETS,
    SECONDS_BUCKETS,
    Address,
    MetricsServer,
    PortInUse,
    Registry,
    bind,
)

if TYPE_CHECKING:
    from orchestrator.namespace import Committer

PUBLISH_EVERY = 0.1  # seconds between two updates of the gauges from the driver's loop


class MetricsPortError(PipelineError):
    """Raised when the metrics port (the driver's or a worker's) cannot be bound."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


def reason_label(reason: str, kind: str) -> str:
    """A bad line's reason as a label with few values (the text itself names the line)."""
    if kind == "timeout":
        return "timeout"
    if kind == "killed":
        return "worker_killed"
    if reason.startswith("invalid UTF-8"):
        return "invalid_utf8"
    if reason.startswith("invalid JSON"):
        return "invalid_json"
    if reason.startswith("line is ") and reason.endswith("-byte limit"):
        return "too_long"
    return "rejected"  # the flow raised on it


class DriverMetrics:
    """What a driver command counts and serves."""

    def __init__(self, namespace: str, policy: str) -> None:
        self.ns = (namespace,)
        self.policy = policy
        reg = self.registry = Registry()
        ns = ("namespace",)
        self.events_read = reg.counter(
            "orchestrator_events_read_total",
            "Events the driver read from the input and sent to the partitions.",
            ns,
        )
        self.events_committed = reg.counter(
            "orchestrator_events_committed_total",
            "Events of the batches the partitions committed (the flow's rejections included).",
            ns,
        )
        self.lines_read = reg.counter(
            "orchestrator_lines_read_total", "Input lines (epochs) the driver read.", ns
        )
        self.batches_sent = reg.counter(
            "orchestrator_batches_sent_total", "Batches sent or staged for the workers.", ns
        )
        self.batches_committed = reg.counter(
            "orchestrator_batches_committed_total", "Batches whose commit the driver read.", ns
        )
        self.resent = reg.counter(
            "orchestrator_batches_resent_total",
            "Batches sent again because their worker was lost (killed, disconnected).",
            ns,
        )
        self.restarts = reg.counter(
            "orchestrator_worker_restarts_total",
            "Worker processes of this command that died and were started again.",
            ns,
        )
        self.bad_lines = reg.counter(
            "orchestrator_bad_lines_total",
            "Bad lines and rejected events, by --on-error policy and reason.",
            ("namespace", "policy", "reason"),
        )
        self.dead_letters = reg.counter(
            "orchestrator_dead_letters_total",
            "Lines recorded in the dead-letter stream (--on-error dead-letter).",
            ns,
        )
        self.reconnects = reg.counter(
            "orchestrator_redis_reconnects_total",
            "Times this process got Redis back after losing it.",
        )
        self.committed_epoch = reg.gauge(
            "orchestrator_committed_epoch",
            "The last epoch every partition has committed (-1: none).",
            ns,
        )
        self.read_epoch = reg.gauge(
            "orchestrator_read_epoch", "The last epoch the driver read (-1: none).", ns
        )
        self.lag_events = reg.gauge(
            "orchestrator_lag_events", "Events read and not yet committed by their partition.", ns
        )
        self.lag_seconds = reg.gauge(
            "orchestrator_lag_seconds",
            "Age of the oldest line read and not yet committed (0 when none waits).",
            ns,
        )
        self.in_flight = reg.gauge(
            "orchestrator_batches_in_flight", "Batches queued, running or staged.", ns
        )
        self.workers = reg.gauge(
            "orchestrator_worker_processes", "Worker processes this command runs.", ns
        )
        self.retained_from = reg.gauge(
            "orchestrator_retained_from_epoch",
            "The oldest epoch a replay can start at (the start of the retention window).",
            ns,
        )
        self.retain_epochs = reg.gauge(
            "orchestrator_retain_epochs", "The retention window's length (--retain-epochs).", ns
        )
        self.restore_seconds = reg.gauge(
            "orchestrator_restore_duration_seconds",
            "Time this run took to start: claim the partitions and restore their state as of "
            "the epoch it starts after (a resume's or replay's restore).",
            ns,
        )
        self.start_time = reg.gauge(
            "orchestrator_run_start_time_seconds", "When this run started (Unix time).", ns
        )
        self.batch_events = reg.histogram(
            "orchestrator_batch_events",
            "Events per batch sent.",
            ns,
            buckets=EVENTS_BUCKETS,
        )
        self.batch_seconds = reg.histogram(
            "orchestrator_batch_duration_seconds",
            "From a batch's dispatch to the driver reading its commit.",
            ns,
            buckets=SECONDS_BUCKETS,
        )
        self.commit_seconds = reg.histogram(
            "orchestrator_commit_duration_seconds",
            "Time to record the committed epoch (output file synced, fenced record script).",
            ns,
            buckets=SECONDS_BUCKETS,
        )
        for counter in (self.events_read, self.events_committed, self.lines_read):
            counter.touch(self.ns)
        for counter in (self.batches_sent, self.batches_committed, self.resent):
            counter.touch(self.ns)
        for counter in (self.restarts, self.dead_letters):
            counter.touch(self.ns)
        self.reconnects.touch()
        self.start_time.set(time.time(), self.ns)
        self._published_at = 0.0
        self.committer: Committer | None = None  # (its retention window)

    def bad_line(self, reason: str, kind: str) -> None:
        """Count one bad line or rejected event."""
        self.bad_lines.inc(1, (*self.ns, self.policy, reason_label(reason, kind)))

    def due(self) -> bool:
        """Whether the gauges are due for an update (at most every PUBLISH_EVERY seconds)."""
        now = time.monotonic()
        if now - self._published_at < PUBLISH_EVERY:
            return False
        self._published_at = now
        return True

    def publish(
        self,
        *,
        committed: int,
        read_epoch: int,
        events_read: int,
        lines_read: int,
        lag_events: int,
        oldest_read_at: float | None,
        in_flight: int,
        resent: int,
    ) -> None:
        """Update the gauges, and the counts the driver keeps itself, from its loop."""
        ns = self.ns
        self.committed_epoch.set(committed, ns)
        self.read_epoch.set(read_epoch, ns)
        self.events_read.values[ns] = events_read
        self.lines_read.values[ns] = lines_read
        self.lag_events.set(lag_events, ns)
        lag = 0.0 if oldest_read_at is None else max(0.0, time.monotonic() - oldest_read_at)
        self.lag_seconds.set(lag, ns)
        self.in_flight.set(in_flight, ns)
        self.resent.values[ns] = resent
        if self.committer is not None and self.committer.retained_from is not None:
            self.retained_from.set(self.committer.retained_from, ns)


class DriverServer:
    """The driver's metrics server and the worker ports it checked, for one command."""

    def __init__(self, address: Address, metrics: DriverMetrics, workers: int) -> None:
        try:
            self.server = MetricsServer(metrics.registry, address)
            # The workers bind their own ports once started: taken ones are refused now,
            # before anything starts, rather than by workers dying at their start.
            for i in range(workers):
                bind(worker_address(address, i)).close()
        except PortInUse as e:
            self.close()
            raise MetricsPortError(str(e)) from None
        self.metrics = metrics
        os.register_at_fork(after_in_child=self.server.close_in_child)

    def close(self) -> None:
        """Stop serving."""
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


def worker_address(address: Address, index: int) -> Address:
    """Where worker ``index`` (from 0) of a command serving metrics on ``address`` serves."""
    return address.offset(1 + index)


def serve_or_refuse(address: Address, reconnects: Any) -> MetricsServer:
    """A worker process's metrics server (``tasks.metrics.WORKER`` counts from then on).

    Raises:
        MetricsPortError: the address cannot be bound.
    """
    from tasks.metrics import serve_worker_metrics

    try:
        return serve_worker_metrics(address, reconnects)
    except PortInUse as e:
        raise MetricsPortError(str(e)) from None
