"""`status --json` follows docs/status.schema.json and shows the last run's outcome (also of a
run that failed); `health` exits 0 healthy or 1 unhealthy, with one line saying why."""

import json
import signal
import socket
import subprocess
import sys
import time

import jsonschema
import pytest
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from orchestrator.failures import failure
from tasks.errors import ExitStatus, InvalidEvent, RedisUnavailable
from tasks.keys import Keys

from conftest import REPO, SEED_INPUT, cli_env, new_namespace, run_cli
from reference import reference_run

SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())
SEED = SEED_INPUT.read_text().splitlines(keepends=True)


def status(args, cwd):
    run = run_cli("status", "--json", *args, cwd=cwd)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    jsonschema.Draft202012Validator(SCHEMA, format_checker=None).validate(report)
    return report


def events_of(lines, first, last):
    """Events (output lines) of epochs first..last by the plain loop, bad lines left out."""
    out, _ = reference_run(lines[: last + 1], from_epoch=first, skip_bad=True)
    return out.count("\n")


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_one_mapping_from_failures_to_exit_statuses():
    import redis

    assert failure(KeyboardInterrupt())[0] == 130
    assert failure(BrokenPipeError())[0] == 141
    assert failure(redis.ConnectionError("gone"))[0] == ExitStatus.REDIS_UNAVAILABLE == 3
    assert failure(RedisUnavailable("gone"))[0] == 3
    assert failure(InvalidEvent("bad"))[0] == InvalidEvent.exit_status
    assert failure(ValueError("a bug")) is None  # a bug keeps its traceback


@pytest.mark.integration
def test_status_of_an_empty_a_failed_and_a_finished_run(redis_url, tmp_path):
    (tmp_path / "cart-join.json").write_text("".join(SEED))
    args = ["--redis-url", redis_url, "--namespace", new_namespace()]
    empty = status(args, tmp_path)
    assert empty["schema_version"] == 1 and empty["last_run"] is None
    assert empty["partitions"] is None and empty["partition_progress"] is None
    assert empty["workers"] == 0 and empty["committed_events_per_s"] is None

    # The seed's line 6 (epoch 5) is bad: the run commits epochs 0-4 and exits 65.
    failed = run_cli("ingest", "cart-join.json", "--workers", "1", *args, cwd=tmp_path)
    assert failed.returncode == ExitStatus.DATA_ERROR == 65, failed.stderr
    last = status(args, tmp_path)["last_run"]
    assert (last["command"], last["exit_status"]) == ("ingest", 65)
    assert last["reason"].startswith("cart-join.json:6 (epoch 5): invalid JSON")
    assert (last["first_epoch"], last["committed_epoch"], last["epochs"]) == (0, 4, 5)
    assert last["events"] == events_of(SEED, 0, 4)
    assert last["started_at"] <= last["ended_at"]

    done = run_cli(
        "resume", "cart-join.json", "--workers", "1", "--on-error", "skip", *args, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    report = status(args, tmp_path)
    last = report["last_run"]
    assert (last["command"], last["exit_status"]) == ("resume", 0)
    assert last["reason"].startswith("done")
    assert (last["first_epoch"], last["committed_epoch"], last["epochs"]) == (5, 7, 3)
    assert last["events"] == events_of(SEED, 5, 7) == 2
    assert report["committed_events_per_s"] > 0 and report["lag_events"] is None


def fake_worker(url, keys, partitions):
    """A registered, heartbeating RQ worker of this host (this process) that takes no job."""
    import redis

    worker = SimpleWorker(
        keys.queue_names(partitions),
        connection=redis.Redis.from_url(url),
        serializer=JSONSerializer,
    )
    worker.register_birth()
    return worker


def health(*args, cwd):
    run = run_cli("health", *args, cwd=cwd)
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) == 1, (run.returncode, lines)
    return run.returncode, lines[0]


@pytest.mark.integration
def test_health_and_status_of_a_running_run_and_its_interrupted_outcome(redis_url, tmp_path):
    ns = new_namespace()
    keys = Keys(ns)
    args = ["--redis-url", redis_url, "--namespace", ns]
    lines = [
        json.dumps({"user_id": f"u{i % 7}", "type": "order", "order_id": i}) for i in range(40)
    ]
    (tmp_path / "in.json").write_text("\n".join(lines) + "\n")

    assert health("-u", "unix:///nonexistent/redis.sock", cwd=tmp_path)[0] == 1  # Redis down
    code, line = health(*args, cwd=tmp_path)
    assert code == 1 and "no live worker" in line

    # A driver with no worker process: it reads everything and waits for the batches.
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", "in.json", "--workers", "0",
         "--partitions", "2", *args],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 60
        while True:
            report = status(args, tmp_path)
            if report["lag_events"] == len(lines):
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        assert report["driver"].startswith(socket.gethostname() + ":")
        assert report["committed_epoch"] == -1 and report["recorded_at"] is not None

        worker = fake_worker(redis_url, keys, 2)
        code, line = health(*args, "--max-lag", str(len(lines) - 1), cwd=tmp_path)
        assert code == 1 and f"lag {len(lines)} events is over --max-lag" in line
        code, line = health(*args, "--max-lag", str(len(lines)), cwd=tmp_path)
        assert code == 0 and line.startswith("healthy:"), line
        assert health(*args, "--role", "worker", cwd=tmp_path)[0] == 0
        assert health(*args, "--role", "driver", cwd=tmp_path)[0] == 0
    finally:
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=60)
        if worker is not None:
            worker.register_death()
    assert driver.returncode == ExitStatus.INTERRUPTED, err
    last = status(args, tmp_path)["last_run"]
    assert (last["command"], last["exit_status"], last["reason"]) == (
        "ingest",
        130,
        "interrupted; committed epochs are kept: "
        f"'orchestrator resume in.json --namespace {ns} --partitions 2' continues",
    )
    assert (last["committed_epoch"], last["epochs"], last["events"]) == (-1, 0, 0)
    code, line = health(*args, "--role", "driver", cwd=tmp_path)
    assert code == 1 and "no driver runs" in line


@pytest.mark.integration
def test_status_and_health_of_a_stream_input_show_how_far_the_stream_is_ahead(
    redis_url, real, tmp_path
):
    ns = new_namespace()
    key = f"{ns}-events"  # (not a key of the namespace: reset leaves it)
    args = ["--redis-url", redis_url, "--namespace", ns]
    for line in SEED[:5]:  # the seed's lines before its bad one
        real.xadd(key, {"event": line.rstrip("\n")})
    try:
        run = run_cli("ingest", f"redis-stream:{key}", "--workers", "1", *args, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        report = status(args, tmp_path)
        assert report["source_position"] == real.xrevrange(key, count=1)[0][0].decode()
        assert (report["source_lag_entries"], report["source_lag_seconds"]) == (0, 0.0)
        assert report["last_run"]["events"] == events_of(SEED, 0, 4)

        # One entry a minute newer than the committed one arrives; nobody reads it.
        committed_ms = int(report["source_position"].split("-")[0])
        real.xadd(key, {"event": SEED[6].rstrip("\n")}, id=f"{committed_ms + 60_000}-0")
        report = status(args, tmp_path)
        assert report["source_lag_entries"] == 1 and report["source_lag_seconds"] == 60.0
        worker = fake_worker(redis_url, Keys(ns), report["partitions"])
        try:
            code, line = health(*args, "--max-lag-seconds", "30", cwd=tmp_path)
            assert code == 1 and "lag 60 s is over --max-lag-seconds 30" in line
            code, line = health(*args, "--max-lag", "0", cwd=tmp_path)
            assert code == 1 and "lag 1 event is over --max-lag 0" in line
            code, line = health(*args, "--max-lag", "1", "--max-lag-seconds", "90", cwd=tmp_path)
            assert code == 0 and "lag 1 event, 60 s behind the stream" in line, line
        finally:
            worker.register_death()
    finally:
        real.delete(key)


@pytest.mark.integration
def test_max_lag_seconds_on_a_file_input_is_refused(redis_url, tmp_path):
    (tmp_path / "in.json").write_text("".join(SEED[:5]))
    args = ["--redis-url", redis_url, "--namespace", new_namespace()]
    assert run_cli("ingest", "in.json", "--workers", "1", *args, cwd=tmp_path).returncode == 0
    run = run_cli("health", *args, "--max-lag-seconds", "5", cwd=tmp_path)
    assert run.returncode == ExitStatus.USAGE and run.stdout == ""
    assert run.stderr.startswith("orchestrator: --max-lag-seconds needs a redis-stream:KEY input")
    assert len(run.stderr.splitlines()) == 1
