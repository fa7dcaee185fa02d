"""Workers run by hand: `orchestrator worker` processes, by URL and on the embedded server."""

import signal
import subprocess
import sys

import pytest

from bench.generate import generate

from conftest import cli_env, new_namespace, run_cli
from reference import reference_run

pytestmark = pytest.mark.integration


def start_worker(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", *args],
        cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    return stderr


@pytest.fixture
def events(tmp_path):
    lines = list(generate(5_000, 300, seed=3))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, reference_run(lines)[0]


def test_external_workers_started_before_the_first_ingest(events, redis_url, tmp_path):
    path, expected = events
    args = ["--redis-url", redis_url, "--namespace", new_namespace()]
    workers = [start_worker(*args, cwd=tmp_path) for _ in range(2)]
    try:
        for w in workers:
            assert "waiting for a first 'orchestrator ingest'" in w.stderr.readline()
        run = run_cli("ingest", str(path), *args, "--partitions", "5", cwd=tmp_path)
    finally:
        for w in workers:
            stop(w)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected


def test_a_worker_joins_the_embedded_server_of_a_running_driver(events, tmp_path):
    path, expected = events
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--workers", "0"],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The driver says it waits for workers once its server runs; then a worker can join it.
    assert "waiting for workers" in driver.stderr.readline()
    worker = start_worker(cwd=tmp_path)
    try:
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        worker_err = stop(worker)
    assert driver.returncode == 0, stderr
    assert stdout == expected
    assert "using the embedded server in" in worker_err


def test_a_worker_without_a_running_embedded_server_says_what_to_do(tmp_path):
    run = run_cli("worker", cwd=tmp_path)
    assert run.returncode == 3
    assert "no command is running an embedded server" in run.stderr


def test_a_stop_asked_while_rqs_worker_tears_down_ends_the_worker_quietly(fake, monkeypatch):
    """RQ raises StopRequested from its SIGTERM handler; a SIGTERM that lands while its worker
    tears down after an error (a full disk: MISCONF) escapes RQ's loop. It is the stop that
    was asked for, not a crash with a traceback (seen in tests/test_full_disk.py)."""
    from rq.exceptions import StopRequested

    from orchestrator import workers
    from tasks.keys import Keys

    keys = Keys(new_namespace())
    fake.hset(keys.meta, "partitions", 2)

    def tear_down_stopped(self, **kwargs):
        raise StopRequested()

    monkeypatch.setattr(workers.PipelineWorker, "work", tear_down_stopped)
    workers.run_worker(fake, keys, announce_wait=False)  # returns: no exception


@pytest.mark.parametrize("asked_to_stop", [True, False])
def test_redis_gone_after_a_requested_stop_is_not_the_workers_to_report(
    fake, monkeypatch, asked_to_stop
):
    """A forked worker told to stop (its driver saw the embedded server die) that then finds
    Redis gone while RQ tears down exits quietly: the driver says why, once. Without a stop
    asked for, losing Redis is the worker's own error to report (exit 3)."""
    import redis

    from orchestrator import workers
    from tasks.keys import Keys

    keys = Keys(new_namespace())
    fake.hset(keys.meta, "partitions", 2)

    def redis_gone(self, **kwargs):
        self.stop_requested = asked_to_stop
        raise redis.ConnectionError("Error 111 connecting to redis.sock. Connection refused.")

    monkeypatch.setattr(workers.PipelineWorker, "work", redis_gone)
    if asked_to_stop:
        workers.run_worker(fake, keys, announce_wait=False)
    else:
        with pytest.raises(redis.ConnectionError):
            workers.run_worker(fake, keys, announce_wait=False)
