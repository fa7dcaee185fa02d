"""The keeper: stops a data directory's embedded redis-server once no command uses it.

``python -I -S .../orchestrator/keeper.py DATA_DIR --lock-fd N --server-pid P --url URL`` is
started,
in a session of its own, by the command that starts the server
(``orchestrator.embedded.attach``). It inherits the data directory's server lock
(fd N) and holds it for as long as server P runs: a command that finds the lock
held uses the running server instead of starting one.

Commands using the server each hold a shared lock on ``attach.lock``, and the
last one to leave stops the server itself (compacting its append-only file
first), then ends the keeper with SIGTERM. The keeper is for the other case:
every command was killed, their locks went with them, and the keeper finds
``attach.lock`` free and stops the server (SIGTERM: it flushes its append-only
file and exits).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

# The files of a data directory that the keeper and the commands share:
ATTACH_LOCK = "attach.lock"  # held (shared) by every command attached to the server
SERVER_INFO = "server.json"  # the running server: its pid, its keeper's, its socket


def is_redis_server(pid: int) -> bool:
    """Whether ``pid`` is a running redis-server (not exited, not a zombie).

    By the process's name in /proc/PID/stat, which exec sets: not by its command
    line, which redis-server rewrites at its start (its title), and which reads
    as anything in between.
    """
    return _running_as(pid, b"redis-server")


def is_keeper(pid: int) -> bool:
    """Whether ``pid`` is a running keeper (by the name it gives itself, ``PROCESS_NAME``).

    Asked before a keeper is killed by its recorded pid: the record says 0 while a
    command is starting the keeper (``os.kill(0, ...)`` would kill the caller's whole
    process group), and the pid of a keeper that has exited may be another process's.
    """
    return _running_as(pid, PROCESS_NAME)


def _running_as(pid: int, name: bytes) -> bool:
    """Whether process ``pid`` runs (not exited, not a zombie) under the name ``name``."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    found, _, rest = stat.partition(b"(")[2].rpartition(b")")
    state = rest.split()[:1]
    return found == name and state not in ([b"Z"], [b"X"], [])


def forget_server(data_dir: Path, server_pid: int, url: str) -> None:
    """Remove the record and the socket directory of a server that has exited."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads((data_dir / SERVER_INFO).read_text())["pid"]) == server_pid:
            (data_dir / SERVER_INFO).unlink()
    if url.startswith("unix://"):
        shutil.rmtree(os.path.dirname(url[len("unix://") :]), ignore_errors=True)


POLL_EVERY = 0.05  # seconds between two looks at the server and at the attach lock
STOP_TIMEOUT = 30.0  # seconds a server gets to exit after SIGTERM before SIGKILL


class Stop(Exception):
    """Raised by SIGTERM: the last command stopped the server, or someone stops the keeper."""


def _stop(signum: int, frame: Any) -> None:
    raise Stop


def run(data_dir: Path, lock_fd: int, server_pid: int, url: str) -> int:
    """Watch server ``server_pid`` until it exits, or stop it once no command is attached."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _name_process()
    os.chdir(data_dir)  # (ps and /proc tell whose keeper it is: its name and its directory)
    server_lock = os.fdopen(lock_fd, "a+")
    attach_file = open(data_dir / ATTACH_LOCK, "a+")  # noqa: SIM115
    signal.signal(signal.SIGTERM, _stop)
    try:
        while is_redis_server(server_pid) and not _nobody_attached(attach_file):
            time.sleep(POLL_EVERY)
    except Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop_server(server_pid)
    forget_server(data_dir, server_pid, url)
    server_lock.close()  # a command waiting to start a new server may go on
    attach_file.close()
    return 0


PROCESS_NAME = b"orch-keeper"  # what ps shows (a forked keeper would show its command's)


def _name_process() -> None:
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        PR_SET_NAME = 15
        ctypes.CDLL(None).prctl(PR_SET_NAME, PROCESS_NAME, 0, 0, 0)


def _nobody_attached(attach_file: Any) -> bool:
    try:
        fcntl.flock(attach_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _stop_server(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns once the server is gone."""
    deadline = time.monotonic() + STOP_TIMEOUT
    if is_redis_server(pid):
        os.kill(pid, signal.SIGTERM)
    while is_redis_server(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.keeper", description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--url", required=True)
    args = parser.parse_args(argv)
    return run(args.data_dir.resolve(), args.lock_fd, args.server_pid, args.url)


if __name__ == "__main__":
    raise SystemExit(main())
