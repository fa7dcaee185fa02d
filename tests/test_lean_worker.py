"""The lean worker (the ``rq`` knob) writes RQ's bookkeeping less often: under
``appendfsync always`` every write round trip is an fsync, on the path of every batch."""

from __future__ import annotations

import signal

import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

import tasks.rqcompat
from tasks.rqcompat import LeanWorker


@pytest.fixture
def calls(monkeypatch):
    """Every heartbeat RQ's own code writes (the worker's and the jobs'), by kind."""
    seen: list[str] = []
    worker_heartbeat, job_heartbeat = BaseWorker.heartbeat, Job.heartbeat

    def worker(self, timeout=None, pipeline=None):
        seen.append("worker" if timeout is None else "worker at a job's start")
        worker_heartbeat(self, timeout, pipeline)

    def job(self, timestamp, ttl, pipeline=None, xx=False):
        seen.append("job at its start" if pipeline is not None else "job alone")
        job_heartbeat(self, timestamp, ttl, pipeline, xx)

    monkeypatch.setattr(BaseWorker, "heartbeat", worker)
    monkeypatch.setattr(Job, "heartbeat", job)
    return seen


def run_jobs(fake, count: int) -> None:
    queue = Queue("lean", connection=fake, serializer=JSONSerializer)
    for i in range(count):
        queue.enqueue("builtins.len", [i], result_ttl=120)  # as the batch jobs are
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        LeanWorker([queue], connection=fake, serializer=JSONSerializer).work(burst=True)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert queue.count == 0


def test_jobs_within_a_heartbeat_interval_write_the_workers_heartbeat_once(
    fake, calls, monkeypatch
):
    monkeypatch.setattr(tasks.rqcompat, "HEARTBEAT_EVERY", 3600.0)  # (however slow the machine)
    run_jobs(fake, 3)
    # One heartbeat an interval, whatever RQ asks for between jobs (its check for `rq suspend`
    # included); the start of each job still writes its own, in its transaction.
    assert calls.count("worker") == 1
    assert calls.count("worker at a job's start") == 3
    # A job's end is recorded right after it ends: no heartbeat is written for it alone.
    assert calls.count("job at its start") == 3
    assert "job alone" not in calls


def test_with_the_knob_off_rq_writes_every_heartbeat(fake, calls, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_TUNING", "-rq")
    run_jobs(fake, 3)
    assert calls.count("worker") > 3
    assert calls.count("job alone") == 3
