"""An idle ``orchestrator worker`` says nothing, then works (issue 13, Done-when 3).

redis-py 8 gives every connection a read timeout by default: 5 s, the constant
``DEFAULT_SOCKET_TIMEOUT = 5`` in ``redis/_defaults.py``, which is the default of
``socket_timeout`` in ``redis.Redis.__init__`` (``redis/client.py``) and in
``AbstractConnection`` and ``UnixDomainSocketConnection`` (``redis/connection.py``).
redis-py 7 had none (``socket_timeout=None``). RQ's worker waits for a job in a
blocking BLPOP; a BLPOP longer than the read timeout ends in a TimeoutError,
which the reconnect wrapper used to report as "lost the connection to Redis"
every few seconds on an idle worker.

Here a worker sits idle on a real redis-server for more than three times that
default, with the redis-py installed (CI installs the newest the pins allow),
and must print nothing; then a run with ``--workers 0`` — so that worker alone
executes its batches — gives exact output.
"""

from __future__ import annotations

import inspect
import signal
import subprocess
import sys
import time

import pytest
import redis

from bench.generate import generate

from conftest import REPO, cli_env, new_namespace, run_cli
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STATED_DEFAULT = 5  # seconds: redis-py 8's default read timeout, as the docstring says


def redis_py_default_read_timeout() -> float:
    """The installed redis-py's default ``socket_timeout`` (at least the 5 s of redis-py 8)."""
    default = inspect.signature(redis.Redis.__init__).parameters["socket_timeout"].default
    if int(redis.__version__.split(".")[0]) >= 8:
        assert default == STATED_DEFAULT, (redis.__version__, default)
    return max(default or 0, STATED_DEFAULT)


def test_a_worker_idle_for_three_read_timeouts_is_silent_then_runs_a_resume(own_redis, tmp_path):
    lines = list(generate(3_000, 200, seed=13))
    first, rest = lines[:2_000], lines[2_000:]
    path = tmp_path / "events.json"
    path.write_text("\n".join(first) + "\n")
    args = ["--redis-url", own_redis.url, "--namespace", new_namespace()]
    # A first run with a worker of its own sets the namespace up, so that the worker
    # started next goes straight to RQ's blocking dequeue (no "waiting for" line).
    setup = run_cli("ingest", str(path), *args, "--partitions", "3", "--workers", "1", cwd=REPO)
    assert setup.returncode == 0, setup.stderr
    assert setup.stdout == reference_run(first)[0]

    out, err = (open(tmp_path / name, "w+") for name in ("worker.out", "worker.err"))
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", *args],
        cwd=REPO, env=cli_env(), stdout=out, stderr=err, text=True,
    )  # fmt: skip
    try:
        time.sleep(3 * redis_py_default_read_timeout() + 2)
        assert worker.poll() is None
        out.seek(0), err.seek(0)
        assert (out.read(), err.read()) == ("", "")

        with open(path, "a") as f:
            f.write("\n".join(rest) + "\n")
        resumed = run_cli("resume", str(path), *args, "--workers", "0", cwd=REPO, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout == reference_run(lines, from_epoch=len(first))[0]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    out.seek(0), err.seek(0)
    assert (out.read(), err.read()) == ("", "")
    out.close(), err.close()
