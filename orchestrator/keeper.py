"""The keeper: the process that runs a data directory's embedded redis-server.

``python -m orchestrator.keeper DATA_DIR --lock-fd N`` is started by the first
command that needs the server (``orchestrator.embedded.attach``), in a session
of its own: the terminal's Ctrl-C, sent to every process of the foreground
group, does not reach it or its server. It inherits the data directory's
server lock (fd N) from that command and holds it while it runs.

The commands using the server each hold a shared lock on ``attach.lock``. The
last one to leave stops the server itself (it compacts the append-only file
first); the keeper then sees its server gone and leaves. If every command was
killed, their locks went with them: the keeper finds ``attach.lock`` free and
stops the server (SIGTERM: it flushes its append-only file and exits).

Only the standard library and ``orchestrator.embedded`` are imported: the
keeper starts on every first command's critical path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.embedded import (
    ATTACH_LOCK,
    SERVER_INFO,
    die_with_parent,
    server_args,
    server_environment,
    stop_orphan,
)

POLL_EVERY = 0.05  # seconds between two looks at the server and at the attach lock
STOP_TIMEOUT = 30.0  # seconds a server gets to exit after SIGTERM before SIGKILL

_stop_requested = False


def _request_stop(signum: int, frame: Any) -> None:
    global _stop_requested
    _stop_requested = True


def run(data_dir: Path, lock_fd: int, *, persistent: bool) -> int:
    """Run the server until no command is attached to it (or it exits); 0 when it stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _request_stop)  # stop the server, then leave
    server_lock = os.fdopen(lock_fd, "a+")
    attach_file = open(data_dir / ATTACH_LOCK, "a+")  # noqa: SIM115
    info_path = data_dir / SERVER_INFO
    stop_orphan(info_path)
    socket_dir = tempfile.mkdtemp(prefix="orchestrator-")
    socket_path = os.path.join(socket_dir, "redis.sock")
    try:
        server = subprocess.Popen(
            server_args(data_dir, socket_path, persistent=persistent),
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - the keeper runs no thread
            env=server_environment(),
        )
        info = {"keeper": os.getpid(), "pid": server.pid, "url": f"unix://{socket_path}"}
        partial = info_path.with_suffix(".tmp")
        partial.write_text(json.dumps(info))
        partial.replace(info_path)  # (readers never see half a file)
        status = _serve(server, attach_file)
    finally:
        _forget(info_path)
        shutil.rmtree(socket_dir, ignore_errors=True)
        server_lock.close()  # first: a command waiting to start a new server may go on
        attach_file.close()
    return status


def _serve(server: subprocess.Popen[bytes], attach_file: Any) -> int:
    while True:
        if server.poll() is not None:  # stopped by the last command to leave, or it died
            return 0 if server.returncode == 0 else 1
        if _stop_requested or _try_exclusive(attach_file):
            # Nobody is attached (all killed) or the keeper is told to stop: stop the server.
            server.terminate()
            try:
                server.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            return 0
        time.sleep(POLL_EVERY)


def _try_exclusive(f: Any) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _forget(info_path: Path) -> None:
    """Remove the server's record, if it is this keeper's."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads(info_path.read_text())["keeper"] == os.getpid():
            info_path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.keeper", description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--no-persistence", action="store_true")
    args = parser.parse_args(argv)
    return run(args.data_dir.resolve(), args.lock_fd, persistent=not args.no_persistence)


if __name__ == "__main__":
    raise SystemExit(main())
