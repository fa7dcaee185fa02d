"""Helpers for tests that run the pipeline several times and check what it committed."""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from dataclasses import dataclass

import orjson
import psutil
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from orchestrator import cli
from orchestrator.server import client_for
from tasks.keys import LEGACY_SLOTS, Keys, Layout
from tasks.rqcompat import LeanWorker, partition_queues


def committed_states(url: str, namespace: str) -> dict[str, object]:
    """Every key's committed state in a namespace, across its partitions."""
    client = redis.Redis.from_url(url)
    try:
        return states_in(client, namespace)
    finally:
        client.close()


def states_in(client: redis.Redis, namespace: str) -> dict[str, object]:
    """Every key's committed state in a namespace, read with ``client``; each key must be in
    the partition its slot gives it (workers look for it nowhere else)."""
    partitions, slots, tagged = client.hmget(
        Keys(namespace).meta, "partitions", "slots", "hash_tags"
    )
    layout = Layout(int(partitions), LEGACY_SLOTS if slots is None else int(slots))
    keys = Keys(namespace, tagged == b"1")
    route = layout.router()
    states: dict[str, object] = {}
    for p in range(layout.partitions):
        for key, value in client.hgetall(keys.state(p)).items():
            assert route(key) == p, f"key {key!r} is in partition {p}, not {route(key)}"
            states[key.decode()] = orjson.loads(value)
    return states


def merge_outputs(*outputs: str) -> str:
    """The output of several runs over one input, one line per epoch, in epoch order.

    A crash can print an epoch's line twice (stdout is at-least-once); both
    copies must be the same line.
    """
    by_epoch: dict[int, str] = {}
    for text in outputs:
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # a line cut by a SIGKILL mid-write; its epoch is printed again later
            epoch = int(line.split(" ", 1)[0])
            assert by_epoch.setdefault(epoch, line) == line, f"epoch {epoch} printed differently"
    return "".join(by_epoch[e] for e in sorted(by_epoch))


def committed_epoch(url: str, namespace: str) -> int:
    """The namespace's recorded committed epoch; -1 if none, or if Redis cannot be reached."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.hget(Keys(namespace).meta, "committed") or -1)
    except redis.RedisError:
        return -1
    finally:
        client.close()


def servers_in(data_dir) -> list[int]:
    """The pids of the redis-servers running in ``data_dir`` (an embedded server's directory)."""
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        try:
            if "redis-server" in (proc.info["name"] or "") and proc.info["cwd"] == str(data_dir):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def keepers_of(data_dir) -> list[int]:
    """The pids of the keeper processes of the embedded server of ``data_dir`` (by the name
    the keeper gives itself and the directory it runs in)."""
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        try:
            if proc.info["name"] == "orch-keeper" and proc.info["cwd"] == str(data_dir):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@dataclass
class CommandRun:
    """What one in-process command gave: its exit status, stdout bytes and stderr text."""

    status: int
    stdout: bytes
    stderr: str


class ThreadWorker:
    """The RQ worker of one namespace, as a thread of the test process (a context manager).

    It takes batch jobs from the partition queues as ``orchestrator worker`` does
    (the same RQ queues, job ids and ``tasks.jobs.process_batch`` with its
    partition lease, batch timer and commit), and records anything a job raised.
    Not RQ's own worker loop: that one installs signal handlers, which only the
    main thread may do; and no worker process, since forking the test process
    while threads run is unsafe. A private list in the namespace wakes it to stop.
    """

    def __init__(self, url: str, namespace: str, partitions: int) -> None:
        keys = Keys(namespace)
        self.client = client_for(url)
        self.queue_keys = [keys.queue_key(p) for p in range(partitions)]
        self.stop_key = f"{namespace}:test-worker-stop"
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._work, name=f"worker {namespace}")

    def __enter__(self) -> ThreadWorker:
        self.client.delete(self.stop_key)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.rpush(self.stop_key, b"stop")
        self.thread.join()
        self.client.delete(self.stop_key)
        self.client.close()

    def _work(self) -> None:
        # (the stop list comes last: a queued batch is taken before the stop)
        watched = [*self.queue_keys, self.stop_key]
        while True:
            popped = self.client.blpop(watched, timeout=1)
            if popped is None:
                continue
            queue_key, job_id = popped
            if queue_key.decode() == self.stop_key:
                return
            try:
                job = Job.fetch(job_id.decode(), connection=self.client, serializer=JSONSerializer)
                job.perform()
            except BaseException as e:  # noqa: BLE001 - the test reports it
                self.errors.append(e)


def run_command(argv: list[str], url: str) -> CommandRun:
    """``orchestrator ARGV`` in this process, its batches run by a ``ThreadWorker``.

    The CLI's own parsing, settings and command (``cli.program``: the driver, then
    the summary and exit status), without ``cli.main``'s process-wide setup (signal
    handlers, logging, GC tuning) and without its error handling: an error the
    command raises propagates to the test. Pass ``--workers 0`` and ``--partitions``.
    """
    args = cli.build_parser().parse_args(argv)
    settings = cli.settings_from(args)
    assert settings.worker_count == 0 and settings.partitions is not None
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    with (
        ThreadWorker(url, settings.namespace, settings.partitions) as worker,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        status = int(cli.program(args, settings))
    assert not worker.errors, worker.errors
    out.flush()
    return CommandRun(status, out.buffer.getvalue(), err.getvalue())


def run_queued_jobs(r, keys: Keys, partitions: int) -> None:
    """What workers do with the queued batch jobs: RQ's worker in burst mode, in this process."""
    worker = LeanWorker(
        partition_queues(r, keys, partitions), connection=r, serializer=JSONSerializer
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.work(burst=True, logging_level="WARNING")
    finally:
        for signum, handler in handlers.items():  # (RQ's worker installs its own)
            signal.signal(signum, handler)
