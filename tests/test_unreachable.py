"""Redis unreachable for more than 30 s: the driver and the workers exit 3 within 35 s.

And an idle ``orchestrator worker`` says nothing while Redis is there: its
blocking dequeue never turns into a "lost the connection" report.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest
import redis

from bench.generate import generate
from orchestrator.server import RECONNECT_FOR, AnnouncedRetry
from tasks.keys import Keys

from conftest import REPO, cli_env, new_namespace
from helpers import committed_epoch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 35.0  # seconds from the server's death to the exit
REDIS_PY_READ_TIMEOUT = 5  # redis-py 8's default socket timeout


def orchestrator(*args: str, stdout, stderr) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=REPO, env=cli_env(), stdout=stdout, stderr=stderr, text=True,
    )  # fmt: skip


def wait_exit(proc: subprocess.Popen, since: float) -> float:
    """Seconds from ``since`` to the process's exit (at most LIMIT + 10)."""
    proc.wait(timeout=max(1.0, since + LIMIT + 10 - time.monotonic()))
    return time.monotonic() - since


def test_driver_and_idle_worker_exit_3_when_redis_stays_away(own_redis, tmp_path):
    """Two servers in one test (their waits overlap): a run loses its server mid-run; an
    idle worker, silent for more than 3x redis-py's read timeout, then loses its own."""
    idle_server = type(own_redis)(str(tmp_path)).start()
    with contextlib.ExitStack() as stack:
        stack.callback(idle_server.stop)
        idle_ns = new_namespace()
        client = redis.Redis.from_url(idle_server.url)
        client.hset(Keys(idle_ns).meta, "partitions", 2)
        client.close()
        worker_err = stack.enter_context(open(tmp_path / "worker.err", "w+"))
        worker = orchestrator(
            "worker", "--redis-url", idle_server.url, "--namespace", idle_ns,
            stdout=subprocess.DEVNULL, stderr=worker_err,
        )  # fmt: skip
        idle_since = time.monotonic()

        path = tmp_path / "events.json"
        path.write_text("\n".join(generate(20_000, 500, seed=5)) + "\n")
        ns = new_namespace()
        driver = orchestrator(
            "ingest", str(path), "--redis-url", own_redis.url, "--namespace", ns,
            "--workers", "2", "--partitions", "2", "--flow", "tests.flows.slow_cart:flow",
            "--batch-events", "300",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while committed_epoch(own_redis.url, ns) < 500:
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.05)
        own_redis.kill()
        driver_lost = time.monotonic()

        # the idle worker: nothing on stderr for more than 3x the read timeout
        time.sleep(max(0.0, idle_since + 3 * REDIS_PY_READ_TIMEOUT + 1 - time.monotonic()))
        assert worker.poll() is None
        worker_err.seek(0)
        assert worker_err.read() == ""
        idle_server.kill()
        worker_lost = time.monotonic()

        driver_took = wait_exit(driver, driver_lost)
        worker_took = wait_exit(worker, worker_lost)
        driver_stderr = driver.stderr.read()
        worker_err.seek(0)
        worker_stderr = worker_err.read()
        driver.stderr.close()
    print(f"driver exit {driver.returncode} after {driver_took:.1f}s; "
          f"idle worker exit {worker.returncode} after {worker_took:.1f}s")  # fmt: skip
    print(driver_stderr, worker_stderr, sep="\n")
    for code, took, stderr in [
        (driver.returncode, driver_took, driver_stderr),
        (worker.returncode, worker_took, worker_stderr),
    ]:
        assert code == 3, stderr
        assert RECONNECT_FOR <= took <= LIMIT, stderr
        assert "Traceback" not in stderr
    assert driver_stderr.splitlines()[-1].startswith(
        f"orchestrator: lost the connection to Redis for more than {RECONNECT_FOR:.0f}s: "
    )
    assert worker_stderr.splitlines()[-1].startswith("orchestrator worker ")
    assert f"Redis unreachable for more than {RECONNECT_FOR:.0f}s" in worker_stderr


def test_the_deadline_counts_from_the_first_failure(monkeypatch):
    """Unit: nested retries share one outage; the deadline holds however long each attempt."""
    monkeypatch.setattr(AnnouncedRetry, "outage_since", None)
    monkeypatch.setattr(AnnouncedRetry, "lost", False)
    monkeypatch.setattr("orchestrator.server.RECONNECT_FOR", 0.6)
    attempts = []

    def slow_failure():
        attempts.append(time.monotonic())
        time.sleep(0.05)  # an attempt that waits for a timeout
        raise redis.ConnectionError("down")

    outer, inner = AnnouncedRetry(), AnnouncedRetry()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        outer.call_with_retry(lambda: inner.call_with_retry(slow_failure, lambda e: None),
                              lambda e: None)  # fmt: skip
    took = time.monotonic() - started
    assert 0.6 <= took < 0.9
    assert len(attempts) >= 3
    # past the deadline, the way out (more calls) fails at once, without an attempt
    tried = []
    with pytest.raises(redis.ConnectionError, match="down"):
        outer.call_with_retry(lambda: tried.append(1), lambda e: None)
    assert tried == []
    # after the outage, a call that fails and then succeeds ends it
    results = iter([redis.ConnectionError("blip"), "ok"])

    def flaky():
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    monkeypatch.setattr(AnnouncedRetry, "outage_since", None)
    assert outer.call_with_retry(flaky, lambda e: None) == "ok"
    assert AnnouncedRetry.outage_since is None and not AnnouncedRetry.lost
