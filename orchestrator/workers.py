"""RQ workers: the `orchestrator worker` loop, and worker processes a command starts itself."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from orchestrator.server import die_with_parent
from tasks.errors import PipelineError
from tasks.keys import Keys

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0


class WorkerDied(PipelineError):
    """Raised when a worker process started by the command exits while batches are in flight."""


def listening_workers(r: Redis, keys: Keys, partitions: int) -> int:
    """How many RQ workers listen on at least one partition queue of the namespace."""
    names = set(keys.queue_names(partitions))
    return sum(1 for w in SimpleWorker.all(connection=r) if names & set(w.queue_names()))


def wait_for_partitions(r: Redis, keys: Keys, poll: float = 1.0) -> int:
    """The namespace's partition count; waits (saying so once) until a first ingest sets it."""
    said = False
    while True:
        value = r.hget(keys.meta, "partitions")
        if value is not None:
            return int(value)
        if not said:
            print(
                f"orchestrator: namespace {keys.namespace!r} has no partitions yet; "
                "waiting for a first 'orchestrator ingest'",
                file=sys.stderr,
            )
            said = True
        time.sleep(poll)


def run_worker(r: Redis, keys: Keys, *, burst: bool = False, verbose: bool = False) -> None:
    """Work on every partition queue of the namespace until stopped (SIGTERM finishes the job)."""
    partitions = wait_for_partitions(r, keys)
    queues = [
        Queue(name, connection=r, serializer=JSONSerializer)
        for name in keys.queue_names(partitions)
    ]
    # SimpleWorker runs jobs in its own process: no fork per job (~10 ms each, RQ-FACTS.md).
    worker = SimpleWorker(queues, connection=r, serializer=JSONSerializer)
    worker.work(burst=burst, logging_level="INFO" if verbose else "WARNING")


class WorkerPool:
    """Worker processes started and stopped by a command (``--workers N``)."""

    def __init__(self, count: int, url: str, namespace: str, *, verbose: bool = False) -> None:
        self.count = count
        self.url = url
        self.namespace = namespace
        self.verbose = verbose
        self.processes: list[subprocess.Popen[bytes]] = []
        self._warned_none = False

    def start(self) -> None:
        """Start the worker processes; the URL goes through the environment, not argv."""
        env = {**os.environ, "REDIS_URL": self.url}
        env.pop("RQ_REDIS_URL", None)
        args = [sys.executable, "-m", "orchestrator", "worker", "--namespace", self.namespace]
        if self.verbose:
            args.append("--verbose")
        for _ in range(self.count):
            self.processes.append(
                subprocess.Popen(
                    args,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent,  # noqa: PLW1509
                )
            )
        logger.info("started %d worker processes", self.count)

    def check_alive(self) -> None:
        """Raise if a started worker process has exited.

        Raises:
            WorkerDied: a worker process exited; its code is in the message.
        """
        for proc in self.processes:
            code = proc.poll()
            if code is not None:
                msg = f"worker process {proc.pid} exited with status {code}"
                raise WorkerDied(msg)

    def note_if_none(self, r: Redis, keys: Keys, partitions: int) -> None:
        """With external workers only: say once on stderr that the run waits for them."""
        if self.processes or self._warned_none:
            return
        if listening_workers(r, keys, partitions) == 0:
            print(
                f"orchestrator: waiting for workers: start some with "
                f"'orchestrator worker --namespace {self.namespace}' (same --redis-url/REDIS_URL)",
                file=sys.stderr,
            )
        self._warned_none = True

    def stop(self) -> None:
        """Ask every worker to finish its job and exit (SIGTERM); kill those that do not."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes = []
