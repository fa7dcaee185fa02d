"""Everything the pipeline does with RQ beyond its public API, in one place.

- The partition queues of a namespace, built one way (JSON serializer: nothing
  is unpickled from Redis).
- ``register_queues``: the queues are added to RQ's set of queues at the start of
  a run, so that ``rq info`` lists every partition queue before its first job.
- ``LeanWorker``: a ``SimpleWorker`` (no fork per job) that writes its
  bookkeeping less often. Under ``appendfsync always`` every write to Redis is an
  fsync, and RQ's worker writes its heartbeat and state several times per job.
  Switched off with the ``rq`` tuning knob (``tasks/tuning.py``).

Beyond these, the pipeline moves job ids into RQ's queue lists itself (a batch's
commit moves its successor into ``Keys.queue_key``: see ``tasks/store.py``), which
relies on RQ's queue being a Redis list of job ids.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from tasks.keys import Keys
from tasks.tuning import enabled, trim_now_and_then


def partition_queues(r: Redis, keys: Keys, partitions: int) -> list[Queue]:
    """The RQ queues of the namespace's partitions, in partition order."""
    return [
        Queue(name, connection=r, serializer=JSONSerializer)
        for name in keys.queue_names(partitions)
    ]


def register_queues(r: Redis, queues: list[Queue]) -> None:
    """Add the queues to RQ's set of queues (what ``rq info`` lists)."""
    r.sadd(Queue.redis_queues_keys, *[queue.key for queue in queues])


RQ_QUEUES_SET = Queue.redis_queues_keys  # RQ's set of every queue's key


def worker_name(namespace: str) -> str:
    """An RQ worker name that says whose it is: ``NAMESPACE@HOST.PID.RAND``.

    RQ uses the name in key names and as the connection's CLIENT SETNAME, which
    refuses spaces and control characters; RQ refuses to register a name that a
    live worker has, and a restarted container reuses pids, hence the random tail.
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
    return f"{namespace}@{host}.{os.getpid()}.{secrets.token_hex(2)}"


HEARTBEAT_EVERY = 1.0  # seconds between two heartbeats of a worker outside a job
MAINTENANCE_DELAY = 30.0  # seconds before a worker's first cleaning of RQ's registries


class LeanWorker(SimpleWorker):
    """RQ's SimpleWorker, with its bookkeeping writes thinned out (the ``rq`` knob)."""

    _heartbeat_sent_at = float("-inf")  # the first one is always sent

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started_at = time.monotonic()
        self._lean = enabled("rq")

    @property
    def should_run_maintenance_tasks(self) -> bool:
        """RQ's registry cleaning, but not in the first seconds of the worker.

        RQ cleans its queues' registries when a worker starts (dozens of commands per
        worker, each write an fsync), which is exactly when a short run such as a
        resume needs the CPU for its few batches. Nothing of ours depends on it:
        it waits MAINTENANCE_DELAY, then runs every ``maintenance_interval`` as usual.
        """
        if self._lean and time.monotonic() - self._started_at < MAINTENANCE_DELAY:
            return False
        return bool(super().should_run_maintenance_tasks)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, sent at most once a second, in one round trip.

        RQ calls it three times per job, each as three separate writes, and once
        more in the transaction that checks for ``rq suspend`` after every job. The
        worker's key lives for minutes, so a heartbeat per second keeps it alive
        all the same; that transaction then only reads (no fsync). Heartbeats that
        set a timeout (``timeout`` given: RQ's job start) go through unchanged.
        """
        if not self._lean or timeout is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        now = time.monotonic()
        if now - self._heartbeat_sent_at < HEARTBEAT_EVERY:
            return
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
        else:
            with self.connection.pipeline(transaction=False) as pipe:
                super().heartbeat(timeout, pipeline=pipe)
                pipe.execute()
        self._heartbeat_sent_at = now

    def handle_execution_ended(self, job: Any, queue: Any, heartbeat_ttl: int) -> None:
        """RQ's end of a job, without the job heartbeat it writes there.

        That heartbeat (the job hash's ``last_heartbeat``) gives a success or failure
        callback time to run, and the pipeline sets none; the transaction right after it
        records the job's end and result: a write, and an fsync, per batch for nothing.
        """
        if not self._lean:
            super().handle_execution_ended(job, queue, heartbeat_ttl)
            return
        job.ended_at = datetime.now(UTC)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's set_state, without writing a state the worker is in already."""
        if self._lean and pipeline is None and state == self.get_state():
            return
        super().set_state(state, pipeline=pipeline)

    def execute_job(self, job: Any, queue: Any) -> None:
        super().execute_job(job, queue)
        trim_now_and_then()

    def subscribe(self) -> None:
        # RQ's command channel (kill-horse, remote shutdown) has nothing to act on in a
        # SimpleWorker stopped by SIGTERM, and joining its thread slows every stop.
        if not self._lean:
            super().subscribe()  # type: ignore[no-untyped-call]
