"""Faults: killed workers, a killed driver, the driver lock, retention, a changed input."""

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from rq import Worker

from bench.generate import generate
from tasks.keys import Keys

from conftest import REPO, SEED_INPUT, cli_env, new_namespace, run_cli, stderr_lines
from helpers import committed_states, merge_outputs
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOW_FLOW = "tests.flows.slow_cart:flow"  # ~1 ms per event: batches last long enough to hit


def popen_cli(*args, cwd=REPO, stdout=subprocess.PIPE):
    # Pass a file as stdout for a long run: nobody reads a pipe until communicate().
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, env=cli_env(), stdout=stdout, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(predicate, timeout=60.0, every=0.02):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return value


@pytest.fixture
def events(tmp_path):
    lines = list(generate(4_000, 300, seed=21))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_a_worker_killed_mid_batch_has_its_batch_rerun_within_10_seconds(events, redis_url, real):
    path, lines = events
    ns = new_namespace()
    keys = Keys(ns)
    args = ["--redis-url", redis_url, "--namespace", ns]
    workers = [popen_cli("worker", *args) for _ in range(2)]
    out = open(path.with_suffix(".out"), "w")  # noqa: SIM115
    driver = popen_cli(
        "ingest", str(path), *args, "--workers", "0", "--partitions", "2", "--flow", SLOW_FLOW,
        stdout=out,
    )  # fmt: skip
    try:
        # Catch a batch while its worker runs it: its lease names the job.
        def running():
            for p in range(2):
                job_id = real.get(keys.lease(p))
                if job_id:
                    return p, job_id.decode()
            return None

        p, job_id = wait_for(running)
        [victim] = wait_for(
            lambda: [w for w in Worker.all(connection=real) if w.get_current_job_id() == job_id]
        )
        applied_before = real.hget(keys.progress(p), "applied")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: real.hget(keys.progress(p), "applied") != applied_before, timeout=30)
        rerun_within = time.monotonic() - killed_at
        _, stderr = driver.communicate(timeout=120)
    finally:
        for w in workers:
            w.kill()
            w.communicate()
        out.close()
    stdout = path.with_suffix(".out").read_text()
    assert driver.returncode == 0, stderr
    assert rerun_within <= 10, rerun_within
    assert "lost its worker; sending it again" in stderr
    expected_out, expected_states = reference_run(lines)
    assert stdout == expected_out  # every event applied once, in per-key order
    assert committed_states(redis_url, ns) == expected_states


def test_a_killed_driver_is_resumed_at_once_and_the_result_is_exact(
    events, redis_url, real, tmp_path
):
    path, lines = events
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2"]
    with open(tmp_path / "first.out", "w") as out:
        # Small batches: the committed epoch advances step by step, and the driver is
        # killed with most of the input still to do.
        driver = popen_cli(
            "ingest", str(path), *args, "--partitions", "3", "--flow", SLOW_FLOW,
            "--batch-events", "300", stdout=out,
        )  # fmt: skip
        wait_for(lambda: int(real.hget(Keys(ns).meta, "committed") or -1) >= 1000, timeout=60)
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=30)
    assert int(real.hget(Keys(ns).meta, "committed")) < len(lines) - 1  # killed mid-run
    first = (tmp_path / "first.out").read_text()
    started = time.monotonic()
    # No waiting for the dead driver's lock to expire: its process is gone, so it is taken over.
    resumed = run_cli("resume", str(path), *args, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert time.monotonic() - started < 25
    assert "the previous driver" in resumed.stderr and "is gone" in resumed.stderr
    expected_out, expected_states = reference_run(lines)
    assert merge_outputs(first, resumed.stdout) == expected_out
    assert committed_states(redis_url, ns) == expected_states


def test_a_live_driver_keeps_its_namespace(redis_url, real, tmp_path):
    ns = new_namespace()
    (tmp_path / "in.json").write_text(SEED_INPUT.read_text())
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "0"]
    first = popen_cli("ingest", "in.json", *args, cwd=tmp_path)
    try:
        wait_for(lambda: real.get(Keys(ns).driver_lock))
        second = run_cli("resume", "in.json", *args, cwd=tmp_path, timeout=30)
        assert second.returncode == 75
        assert "another driver is running" in stderr_lines(second)[0]
    finally:
        first.terminate()
        first.communicate(timeout=30)


def test_retention_keeps_every_current_state_and_bounds_replay(redis_url, real, tmp_path):
    lines = list(generate(3_000, 400, seed=8))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2", "--retain-epochs", "500"]
    run = run_cli("ingest", str(path), *args, "--partitions", "4", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    keys = Keys(ns)
    assert int(real.hget(keys.meta, "retained_from")) == 2_500
    # History older than the window is gone...
    oldest = [real.zrange(keys.undo(p), 0, 0, withscores=True) for p in range(4)]
    assert all(score >= 2_500 for rows in oldest for _, score in rows)
    # ...but every key keeps its newest state, however long ago it last changed.
    expected_out, expected_states = reference_run(lines)
    assert committed_states(redis_url, ns) == expected_states
    refused = run_cli("replay", str(path), *args, "--from-epoch", "2499", cwd=tmp_path)
    assert refused.returncode == 2
    assert "replay can start at 2500 to 3000" in stderr_lines(refused)[0]
    replay = run_cli("replay", str(path), *args, "--from-epoch", "2500", cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == reference_run(lines, from_epoch=2_500)[0]
    assert committed_states(redis_url, ns) == expected_states


def test_a_deleted_state_stays_deleted_through_retention_and_replay(redis_url, real, tmp_path):
    movements = [f'{{"account": "acct{i % 50}", "amount": {i}}}' for i in range(1_000)]
    movements[100] = '{"account": "acct7", "close": true}'  # acct7 closed early, never again
    movements = [
        m for i, m in enumerate(movements) if i <= 100 or not m.startswith('{"account": "acct7"')
    ]
    path = tmp_path / "movements.json"
    path.write_text("\n".join(movements) + "\n")
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1", "--retain-epochs", "200"]
    run = run_cli("ingest", str(path), *args, "--flow", "examples.running_sum:flow", cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "acct7" not in committed_states(redis_url, ns)
    replay = run_cli(
        "replay", str(path), *args, "--from-epoch", str(len(movements) - 100), cwd=REPO
    )
    assert replay.returncode == 0, replay.stderr
    assert "acct7" not in committed_states(redis_url, ns)
    assert len(committed_states(redis_url, ns)) == 49


@pytest.mark.parametrize("change", ["edit", "truncate"])
def test_an_input_changed_before_the_resume_point_is_refused(tmp_path, change):
    path = tmp_path / "cart-join.json"
    path.write_text(SEED_INPUT.read_text())
    assert run_cli("ingest", "cart-join.json", cwd=tmp_path).returncode == 65
    text = path.read_text()
    if change == "edit":
        path.write_text(text.replace('"order_id": 2}', '"order_id": 9}', 1))  # line 2
    else:
        path.write_text(text[:60])
    run = run_cli("resume", "cart-join.json", "--on-error", "skip", cwd=tmp_path)
    assert run.returncode == 66
    [message] = stderr_lines(run)
    assert ("changed before the resume point" if change == "edit" else "shorter") in message
    assert run.stdout == ""


def test_a_server_without_an_append_only_file_gets_one_warning(tmp_path):
    from conftest import RedisServer

    server = RedisServer(str(tmp_path), appendonly=False).start()
    try:
        (tmp_path / "in.json").write_text(SEED_INPUT.read_text())
        run = run_cli(
            "ingest", "in.json", "--redis-url", server.url, "--workers", "1", "--on-error", "skip",
            cwd=tmp_path,
        )  # fmt: skip
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    warnings = [x for x in run.stderr.splitlines() if "warning:" in x]
    assert len(warnings) == 1 and "appendonly no" in warnings[0]


def test_dead_letters_are_recorded_once_and_listed(redis_url, tmp_path):
    import json

    path = tmp_path / "cart-join.json"
    path.write_text(
        SEED_INPUT.read_text()
        + '{"user_id": "c", "type": "refund", "order_id": 5}\n'
        + '{"user_id": "c", "order_id": 5}\n'
    )
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1"]
    run = run_cli("ingest", str(path), *args, "--on-error", "dead-letter", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "dead-lettered 3 bad lines" in run.stderr
    listed = run_cli("dead-letters", "--json", *args[:4], cwd=tmp_path)
    letters = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [(d["line"], d["epoch"]) for d in letters] == [(6, 5), (9, 8), (10, 9)]
    assert letters[0]["raw"] == "FAIL HERE"
    assert letters[1]["reason"] == "unknown event type 'refund' (expected 'order' or 'payment')"
    assert letters[2]["reason"] == "missing field 'type'"
    # Replaying over them records them again once, not twice.
    replay = run_cli(
        "replay", str(path), *args, "--from-epoch", "3", "--on-error", "dead-letter", cwd=tmp_path
    )
    assert replay.returncode == 0, replay.stderr
    again = run_cli("dead-letters", "--json", *args[:4], cwd=tmp_path)
    assert [json.loads(x)["line"] for x in again.stdout.splitlines()] == [6, 9, 10]
    cleared = run_cli("dead-letters", "clear", *args[:4], cwd=tmp_path)
    assert "cleared 3 dead letters" in cleared.stderr
    assert run_cli("dead-letters", "--json", *args[:4], cwd=tmp_path).stdout == ""
    assert redis.Redis.from_url(redis_url).xlen(Keys(ns).dead_letters) == 0
