"""RQ workers: the `orchestrator worker` loop, and worker processes a command starts itself."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from redis import Redis
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer
from rq.worker import DequeueStrategy, WorkerStatus

from orchestrator.embedded import (
    SERVER_DIED,
    ExitWatch,
    die_with_parent,
    ended_normally,
    stop_reason,
)
from orchestrator.errors import WorkerDied
from orchestrator.failures import report_error
from orchestrator.logs import LogFormat, configure_logging, current, worker_flags
from orchestrator.messages import say
from orchestrator.server import (
    DEQUEUE_TIMEOUT,
    RECONNECT_FOR,
    SOCKET_TIMEOUT,
    AnnouncedRetry,
    connect,
    server_config,
)
from orchestrator.settings import Settings, url_secrets
from orchestrator.wording import counted
from tasks.careful import alive_here
from tasks.errors import ExitStatus, RedisUnavailable
from tasks.flow import load_flow
from tasks.keys import Keys
from tasks.metrics import Address
from tasks.rqcompat import LeanWorker, partition_queues, worker_name
from tasks.tuning import tune_process

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0
CRASH_LOOP_SECONDS = 5.0  # a worker that dies sooner than this after its start...
CRASH_LOOP_DEATHS = 3  # ...this many times in a row is not restarted again


# An idle worker heartbeats after every BLPOP (DEQUEUE_TIMEOUT s); one silent this long is
# dead (RQ keeps the registration of a killed worker until its key expires, minutes later).
STALE_AFTER = 60.0

PARTITIONS_LOOK_EVERY = 1.0  # seconds between a worker's looks at the namespace's partition count


def listening_workers(r: Redis, keys: Keys, partitions: int, host: str | None = None) -> int:
    """How many live RQ workers (of ``host``, if given) listen on at least one partition
    queue of the namespace."""
    names = set(keys.queue_names(partitions))
    return sum(
        1
        for w in SimpleWorker.all(connection=r)
        if names & set(w.queue_names()) and (host is None or w.hostname == host) and _alive(w)
    )


def _alive(worker: Any) -> bool:
    """Whether a registered RQ worker still runs: not a dead process of this host, and not
    silent for STALE_AFTER s while idle (a busy worker heartbeats only between jobs)."""
    here = worker.hostname == socket.gethostname()
    if here and worker.pid and not alive_here(worker.hostname, worker.pid):
        return False
    if worker.get_state() == WorkerStatus.BUSY or worker.last_heartbeat is None:
        return True
    age = datetime.now(UTC) - worker.last_heartbeat.replace(tzinfo=UTC)
    return bool(age.total_seconds() < STALE_AFTER)


def _unregister(r: Redis | None, pids: list[int]) -> None:
    """Remove the RQ registrations of this host's worker processes ``pids`` (killed: they
    could not), so that no dead worker shows as listening. Best effort, never waits for Redis."""
    if r is None or not pids or SERVER_DIED.is_set() or AnnouncedRetry.outage_since is not None:
        return
    host = socket.gethostname()
    try:
        for w in SimpleWorker.all(connection=r):
            if w.pid in pids and w.hostname == host:
                w.register_death()
    except redis.RedisError:
        pass


def _registered(r: Redis | None, pid: int) -> bool:
    """Whether the worker process ``pid`` of this host registered as an RQ worker."""
    if r is None:
        return False
    host = socket.gethostname()
    try:
        return any(w.pid == pid and w.hostname == host for w in SimpleWorker.all(connection=r))
    except redis.RedisError:
        return False


def wait_for_partitions(r: Redis, keys: Keys, poll: float = 0.1, *, announce: bool = True) -> int:
    """The namespace's partition count; waits (saying so once) until a first ingest sets it."""
    said = not announce
    while True:
        value = r.hget(keys.meta, "partitions")
        if value is not None:
            return int(value)
        if not said:
            say(
                f"namespace {keys.namespace!r} has no partitions yet; "
                "waiting for a first 'orchestrator ingest'",
                level="INFO",
            )
            said = True
        time.sleep(poll)


class PipelineWorker(LeanWorker):
    """The pipeline's RQ worker: blocking reads that fit the client's timeouts, prompt stops.

    On SIGTERM while idle it stops retrying a lost Redis at once, so that a stop
    during an outage does not wait for the reconnect window; a running batch
    still finishes (and may retry its commit).
    """

    @property
    def dequeue_timeout(self) -> int:
        """How long a BLPOP waits: shorter than the client's read timeout (RQ's 405 s is not).

        RQ raises the read timeout of connections made after it starts to fit its
        BLPOP, but not of those made before; and a long read timeout would let a
        silent server hold a worker past the reconnect deadline. An idle worker
        asks again every few seconds instead (one BLPOP and at most one heartbeat).
        """
        return DEQUEUE_TIMEOUT

    @property
    def connection_timeout(self) -> int:
        # what RQ wants the read timeout to be at least; ours fits the BLPOP already
        return int(SOCKET_TIMEOUT)

    stop_requested = False  # a SIGTERM or Ctrl-C came: the command that sent it reports

    # The namespace whose partition queues the worker follows (None: the queues it was given),
    # and whether it says so when they change (not a worker its own command forked).
    follows: Keys | None = None
    announce = True
    _partitions_seen_at = float("-inf")

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, and (once a second) a look at the namespace's partition count.

        A rescale (``resume --partitions Q``) changes the partition queues while the
        workers of other hosts run: they take the new queues at their next
        heartbeat, which RQ sends between jobs and after every empty BLPOP.
        """
        super().heartbeat(timeout, pipeline=pipeline)
        now = time.monotonic()
        if self.follows is None or now - self._partitions_seen_at < PARTITIONS_LOOK_EVERY:
            return
        self._partitions_seen_at = now
        value = self.connection.hget(self.follows.meta, "partitions")
        if value is None or int(value) == len(self.queues):
            return
        partitions = int(value)
        self.queues = partition_queues(self.connection, self.follows, partitions)
        self._ordered_queues = self.queues[:]
        # What `rq info` and the driver's count of listening workers read.
        self.connection.hset(self.key, "queues", ",".join(self.queue_names()))
        message = (
            f"namespace {self.follows.namespace!r} has {counted(partitions, 'partition')} now "
            f"(rescaled): listening on all their queues"
        )
        if self.announce:
            say(message, level="INFO", who=f"orchestrator worker {os.getpid()}")
        else:
            logger.debug(message)

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stop_requested = True
        if self.get_state() != WorkerStatus.BUSY:
            AnnouncedRetry.give_up = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]


def work(settings: Settings, *, burst: bool = False, announce_wait: bool = True) -> None:
    """``orchestrator worker``: an RQ worker on every partition queue of the namespace."""
    keys = Keys(settings.namespace)
    if settings.flow is not None:
        load_flow(settings.flow)  # fail now, not on the first batch
    if settings.metrics is not None:
        from orchestrator.metrics import serve_or_refuse

        serve_or_refuse(settings.metrics, lambda: AnnouncedRetry.reconnects)
    with connect(settings, join_only=True) as conn:
        run_worker(
            conn.client,
            keys,
            burst=burst,
            verbose=settings.verbose,
            embedded=None if conn.server_pid is None else (conn.server_pid, settings.data_dir),
            announce_wait=announce_wait,
        )


def forked_worker_main(settings: Settings) -> int:
    """The body of a worker process forked by a command; returns its exit status.

    It has everything imported already; it sets up what ``orchestrator worker``
    would (logging, tuning) and reports an expected error in one line.
    """
    configure_logging(
        settings.verbose, log_format=settings.log_format, command="worker", quiet=settings.quiet
    )
    tune_process()
    try:
        # (its command set the namespace up: nothing to announce while it waits)
        work(settings, announce_wait=False)
    except Exception as e:  # noqa: BLE001 - expected errors become one line; others propagate
        return report_error(e, settings.verbose > 0)
    return int(ExitStatus.OK)


def run_worker(
    r: Redis,
    keys: Keys,
    *,
    burst: bool = False,
    verbose: int = 0,
    embedded: tuple[int, Path] | None = None,
    announce_wait: bool = True,
) -> None:
    """Work on every partition queue of the namespace until stopped (SIGTERM finishes the job).

    With ``embedded`` (the pid and data directory of an embedded server that
    other commands run) the worker also ends when that server ends: quietly
    with status 0 when it was stopped because its last command finished, with
    status 3 and the reason when it died.
    """
    AnnouncedRetry.on_deadline = _exit_unreachable
    if embedded is not None:
        _end_with_server(*embedded)
    partitions = wait_for_partitions(r, keys, announce=announce_wait)
    queues = partition_queues(r, keys, partitions)
    worker = PipelineWorker(
        queues, connection=r, serializer=JSONSerializer, name=worker_name(keys.namespace)
    )
    worker.follows, worker.announce = keys, announce_wait
    # RQ sets its loggers' level itself: -v leaves them at warnings, -vv shows their debug lines.
    # Round robin: BLPOP takes the first non-empty queue, and a partition whose commit queues
    # its staged successor at once would keep a worker while the partitions after it wait.
    try:
        worker.work(
            burst=burst,
            logging_level=logging.getLevelName(current().library_level),
            dequeue_strategy=DequeueStrategy.ROUND_ROBIN,
        )
    except StopRequested:
        # RQ raises it from its SIGTERM handler; outside its loop (while it tears down after
        # an error, say) nothing of RQ's catches it: stopping is what was asked for anyway
        logger.debug("stopped while RQ's worker was tearing down")
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if not worker.stop_requested:
            raise
        # Asked to stop (its driver saw the embedded server die, say), it then found Redis
        # gone while RQ tore down: the command that stopped it says why, once.
        logger.debug("stopped; Redis was gone meanwhile: %s", e)


def _end_with_server(server_pid: int, data_dir: Path) -> None:
    """Exit when the embedded server ``server_pid`` ends (seen by a failing call or a thread)."""

    def server_ended() -> None:
        if ended_normally(data_dir, server_pid):
            logger.info("the embedded server stopped: its last command finished")
            status = ExitStatus.OK
        else:
            say(str(stop_reason(data_dir, None, server_pid)))
            status = ExitStatus.REDIS_UNAVAILABLE
        sys.stderr.flush()
        os._exit(int(status))  # (RQ would try to write its bookkeeping to the server)

    watch = ExitWatch(server_pid, server_ended)

    def poll() -> None:
        while not watch.exited(0.0):
            time.sleep(0.2)

    threading.Thread(target=poll, name="server-watch", daemon=True).start()


def _exit_unreachable(error: Exception) -> None:
    """A worker whose Redis stays lost past the deadline exits 3 with one line, at once.

    Whatever it was doing needs Redis (its batch is not committed, and the
    driver sends it again); RQ would log a traceback and try to write its
    bookkeeping, each write waiting for Redis again.
    """
    say(
        f"Redis unreachable for more than {RECONNECT_FOR:.0f}s ({error}); exiting",
        who=f"orchestrator worker {os.getpid()}",
    )
    sys.stderr.flush()
    os._exit(int(ExitStatus.REDIS_UNAVAILABLE))


class ForkedProcess:
    """A forked child, with the part of ``subprocess.Popen``'s interface the pool uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code


WorkerProcess = subprocess.Popen[bytes] | ForkedProcess


def _overwrite_cmdline(args: list[str]) -> None:
    """Write ``args`` over this process's command line (the memory /proc/PID/cmdline reads).

    The kernel reads it from the process's own memory between ``arg_start`` and
    ``arg_end`` (fields 48 and 49 of /proc/PID/stat); CPython copied argv at its
    start and does not read that memory again. Best effort: nothing on failure.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48, 49 (field 3 is index 0)
        if not 0 < start < end:
            return
        text = "\0".join(args).encode()[: end - start - 1]
        ctypes.memmove(start, text.ljust(end - start, b"\0"), end - start)
    except (OSError, ValueError, IndexError):
        pass


def _mask_in_own_cmdline(secrets: list[str]) -> None:
    """Overwrite each secret in this process's command line with as many '*' (same length, so
    the other arguments stay where they are). Best effort: nothing on failure."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            shown = f.read()
        masked = shown
        for secret in secrets:
            raw = secret.encode()
            masked = masked.replace(raw, b"*" * len(raw))
        if masked != shown:
            _overwrite_cmdline([part.decode(errors="replace") for part in masked.split(b"\0")])
    except OSError:
        pass


def _refuses_writes(r: Redis | None) -> bool:
    """Whether the server refuses writes because its last save to disk failed (MISCONF)."""
    if r is None:
        return False
    try:
        info = r.info("persistence")
        stops = server_config(r, "stop-writes-on-bgsave-error")
    except redis.RedisError:
        return False
    rdb_failed = info.get("rdb_last_bgsave_status") == "err" and stops == "yes"
    return bool(rdb_failed or info.get("aof_last_write_status") == "err")


def _argv_holds_secret(url: str) -> bool:
    """Whether this process's command line holds a password of ``url``."""
    secrets = url_secrets(url)
    if not secrets:
        return False
    try:
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        cmdline = " ".join(sys.argv)
    return any(secret in cmdline for secret in secrets)


class WorkerPool:
    """Worker processes started and stopped by a command (``--workers N``)."""

    def __init__(
        self,
        count: int,
        url: str,
        namespace: str,
        *,
        verbose: int = 0,
        quiet: bool = False,
        log_format: LogFormat = "text",
        client: Redis | None = None,
        metrics: Address | None = None,
    ) -> None:
        self.count = count
        self.metrics = metrics  # worker i serves its metrics on the port after it + 1 + i
        self.restarts = 0  # workers that died and were started again
        self.quiet = quiet
        self.client = client  # to remove the RQ registrations of workers that were killed
        self.url = url
        self.namespace = namespace
        self.verbose = verbose
        self.log_format: LogFormat = log_format
        self.processes: list[WorkerProcess] = []
        self._warned_none = False
        self._started: dict[int, float] = {}
        self._quick_deaths = 0

    def start(self) -> None:
        """Start the worker processes; the URL goes through the environment, not argv.

        A password the user typed in ``--redis-url`` is first masked in this process's
        own command line: a forked worker starts with the driver's, and would show it
        in ``ps`` until it writes its own.
        """
        if self.count and _argv_holds_secret(self.url):
            _mask_in_own_cmdline(url_secrets(self.url))
        for i in range(self.count):
            self.processes.append(self._start_one(i))
        logger.info("started %d worker processes", self.count)

    def _start_one(self, index: int) -> WorkerProcess:
        # A forked worker has every module imported already (a spawned one imports them
        # again: a large share of a short resume). Forking is safe only while
        # this process runs no other thread, so restarts during a run are spawned.
        if threading.active_count() == 1:
            return self._fork(index)
        return self._spawn(index)

    def _metrics_address(self, index: int) -> Address | None:
        return None if self.metrics is None else self.metrics.offset(1 + index)

    def _worker_args(self, index: int) -> list[str]:
        args = ["worker", "--namespace", self.namespace, "--started-by-driver"]
        if self.quiet:
            args.append("--quiet")
        if (address := self._metrics_address(index)) is not None:
            args += ["--metrics-port", str(address)]
        return [*args, *worker_flags(self.verbose, self.log_format)]

    def _fork(self, index: int) -> WorkerProcess:
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: run the worker command and never return into the driver
            status = 1
            try:
                die_with_parent()
                if os.getppid() == parent:
                    # (the driver's handlers: RQ's worker installs its own when it starts)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    os.environ["REDIS_URL"] = self.url
                    os.environ.pop("RQ_REDIS_URL", None)
                    self._hide_driver_argv(index)
                    settings = Settings(
                        redis_url=self.url,
                        namespace=self.namespace,
                        verbose=self.verbose,
                        log_format=self.log_format,
                        quiet=self.quiet,
                        metrics=self._metrics_address(index),
                    )
                    status = forked_worker_main(settings)
            except KeyboardInterrupt:  # Ctrl-C before RQ's worker took over its signals
                status = int(ExitStatus.INTERRUPTED)
            except BaseException:  # noqa: BLE001 - the child must reach os._exit
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        self._started[pid] = time.monotonic()
        return ForkedProcess(pid)

    def _hide_driver_argv(self, index: int) -> None:
        """In a forked worker: show its own command line, not the driver's (which may hold a
        password, if masking it in the driver failed).

        A forked child's /proc/PID/cmdline (what ``ps`` shows every user) is the
        driver's, so a password typed in ``--redis-url`` would show in every worker.
        The child writes its own command line over it (as setproctitle does); where
        that fails it execs a fresh worker instead (which imports everything again).
        """
        # Always: `ps` then tells the workers from their driver.
        args = [sys.executable, "-m", "orchestrator", *self._worker_args(index)]
        _overwrite_cmdline(args)
        if _argv_holds_secret(self.url):
            os.execv(sys.executable, args)

    def _spawn(self, index: int) -> WorkerProcess:
        env = {**os.environ, "REDIS_URL": self.url}
        env.pop("RQ_REDIS_URL", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *self._worker_args(index)],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
        self._started[proc.pid] = time.monotonic()
        return proc

    def supervise(self, r: Redis | None = None) -> None:
        """Replace worker processes that died; their batches are re-run by the driver.

        A worker that dies soon after its start counts towards a crash loop only
        if it never registered with RQ (seen through ``r``): one that registered
        and then died was killed by a job (a flow that kills its worker: the
        driver's careful re-runs isolate that event, ``tasks/careful.py``) or
        from outside, and the next one may well live.

        Raises:
            WorkerDied: workers keep dying right after they start (a crash loop).
        """
        for i, proc in enumerate(self.processes):
            code = proc.poll()
            if code is None:
                continue
            if code == ExitStatus.REDIS_UNAVAILABLE and _refuses_writes(r):
                # It said why on stderr: a new worker would only die too. (Status 3 alone
                # proves nothing: a flow may exit with it. A Redis gone for good ends this
                # command on its own, at the deadline.)
                msg = (
                    f"worker process {proc.pid} stopped: the Redis server refuses writes (its "
                    f"last save to disk failed: MISCONF); committed epochs are kept, 'resume' "
                    f"continues once it takes writes again"
                )
                raise RedisUnavailable(msg)
            lived = time.monotonic() - self._started.pop(proc.pid, 0.0)
            quick = lived < CRASH_LOOP_SECONDS and not _registered(r, proc.pid)
            _unregister(r or self.client, [proc.pid])  # (it could not: it died)
            self._quick_deaths = self._quick_deaths + 1 if quick else 0
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            if self._quick_deaths >= CRASH_LOOP_DEATHS:
                msg = f"worker process {proc.pid} {how}, and workers keep dying at start"
                raise WorkerDied(msg)
            self.processes[i] = self._start_one(i)
            self.restarts += 1
            logger.warning(
                "worker process %d %s; started worker %d", proc.pid, how, self.processes[i].pid
            )

    def note_if_none(self, r: Redis, keys: Keys, partitions: int) -> None:
        """With external workers only: say once on stderr that the run waits for them.

        Called when a batch has waited in its queue for a while, so that workers
        started at the same time as the driver are not reported missing.
        """
        if self.processes or self._warned_none:
            return
        self._warned_none = True
        if listening_workers(r, keys, partitions) == 0:
            say(
                f"waiting for workers: start some with "
                f"'orchestrator worker --namespace {self.namespace}' (same --redis-url/REDIS_URL)",
                level="WARNING",
            )

    def stop(self) -> None:
        """Ask every worker to finish its job and exit (SIGTERM); kill those that do not."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # (Without its server a worker's job cannot finish: it would only retry Redis.)
        deadline = time.monotonic() + (0.0 if SERVER_DIED.is_set() else STOP_TIMEOUT)
        killed = []
        for proc in self.processes:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code < 0:
                killed.append(proc.pid)
        _unregister(self.client, killed)
        self.processes = []
