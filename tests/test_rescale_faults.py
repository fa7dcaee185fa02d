"""A rescale under faults, on a real redis-server: a command SIGKILLed at any point of it, a
driver paused in it while another takes over, and a Redis that comes back without it.

Each ends with the namespace at the old count or the new one, never between (every key in
the partition its slot gives it), and a final command gives the plain loop's output and
states.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from test_redis_lost_data import aof_path, one_line_error
from test_status_health import status

from bench.generate import generate
from orchestrator import rescale as moving
from orchestrator.workers import listening_workers
from tasks.keys import Keys

from conftest import REPO, cli_env, new_namespace, run_cli
from helpers import committed_states
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# ~55,000 keys: a rescale long enough (about a second) to be killed in its middle.
LINES = list(generate(150_000, 60_000, seed=5))
FIRST_RUN = 120_000
SHORT_LOCK = cli_env(ORCHESTRATOR_DRIVER_LOCK_TTL="2")  # a killed driver's lock lasts 2 s


@pytest.fixture(scope="module")
def expected() -> tuple[str, dict]:
    return reference_run(f"{line}\n" for line in LINES)


def args(url: str, ns: str, out, *more: str) -> list[str]:
    output = [] if out is None else ["--output", str(out)]
    return ["--redis-url", url, "--namespace", ns, "--workers", "2", *output, *more]


def first_run(tmp_path, url: str, ns: str):
    """Ingest the first lines with 4 partitions; the file then grows to every line."""
    path, out = tmp_path / "events.json", tmp_path / "out.txt"
    path.write_text("".join(f"{line}\n" for line in LINES[:FIRST_RUN]))
    ingest = run_cli("ingest", str(path), *args(url, ns, out, "--partitions", "4"), cwd=REPO)
    assert ingest.returncode == 0, ingest.stderr
    path.write_text("".join(f"{line}\n" for line in LINES))
    return path, out


def start_rescale(path, url: str, ns: str, out, partitions: int) -> subprocess.Popen:
    """``resume --partitions N``, returned once it says it is rescaling."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "resume", str(path),
         *args(url, ns, out, "--partitions", str(partitions))],
        cwd=REPO, env=SHORT_LOCK, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert driver.stderr is not None
    for line in driver.stderr:
        if "rescaling namespace" in line:
            return driver
    pytest.fail(f"no rescale: exit {driver.wait()}")


def partitions_of(url: str, ns: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.hget(Keys(ns).meta, "partitions"))
    finally:
        client.close()


def assert_exact(url, ns, out, expected, partitions):
    assert out.read_text() == expected[0]
    assert committed_states(url, ns) == expected[1]  # (each key in its slot's partition)
    assert partitions_of(url, ns) == partitions


def test_a_rescale_killed_at_any_point_is_done_by_the_next_command(redis_url, tmp_path, expected):
    ns = new_namespace()
    path, out = first_run(tmp_path, redis_url, ns)
    # A rescale of ~55,000 keys takes ~0.2 s here: killed at once, or later and later (the
    # later kills may land after it, in the run that follows it).
    for delay, partitions in [(0.0, 16), (0.02, 16), (0.05, 3), (0.1, 16), (0.2, 1), (1.0, 7)]:
        before = partitions_of(redis_url, ns)
        driver = start_rescale(path, redis_url, ns, out, partitions)
        time.sleep(delay)
        driver.kill()
        driver.communicate()
        # all at the old count or all at the new: committed_states checks every key's place
        committed_states(redis_url, ns)
        assert partitions_of(redis_url, ns) in (before, partitions)

    done = run_cli("resume", str(path), *args(redis_url, ns, out, "--partitions", "16"),
                   cwd=REPO, env=SHORT_LOCK)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_exact(redis_url, ns, out, expected, 16)
    assert staged_keys(redis_url, ns) == []


def test_a_driver_paused_in_its_rescale_moves_nothing_when_it_wakes(redis_url, tmp_path, expected):
    ns = new_namespace()
    path, _ = first_run(tmp_path, redis_url, ns)
    paused = start_rescale(path, redis_url, ns, None, 16)  # (stdout: an output file is locked)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # its lock expires
        other = run_cli("resume", str(path), *args(redis_url, ns, None, "--partitions", "3"),
                        cwd=REPO, env=SHORT_LOCK)  # fmt: skip
        assert other.returncode == 0, other.stderr
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    _, stderr = paused.communicate(timeout=120)
    assert paused.returncode == 75, stderr
    one_line_error(stderr, "another driver")
    output = expected[0].splitlines(keepends=True)
    assert other.stdout == "".join(output[FIRST_RUN:])  # (every line has an output line)
    assert committed_states(redis_url, ns) == expected[1]
    assert partitions_of(redis_url, ns) == 3
    assert staged_keys(redis_url, ns) == []  # (what the paused one staged went with its run)


@pytest.mark.parametrize("cut", ["before", "inside", "after"])
def test_a_redis_that_lost_its_rescale_is_exact_at_the_old_count_or_the_new(
    own_redis, tmp_path, expected, cut
):
    ns = new_namespace()
    path, out = first_run(tmp_path, own_redis.url, ns)
    aof = aof_path(own_redis.directory)
    before = os.path.getsize(aof)
    rescaled = run_cli("resume", str(path), *args(own_redis.url, ns, out, "--partitions", "16"),
                       cwd=REPO)  # fmt: skip
    assert rescaled.returncode == 0, rescaled.stderr
    own_redis.kill()
    with open(aof, "rb") as f:
        f.seek(before)
        grown = f.read()
    # The rescale's MULTI ... EXEC (the one that sets meta's slot count): cut before it, in
    # its middle, or just after its EXEC.
    slots = grown.index(b"\r\n$5\r\nslots\r\n")
    multi = grown.rindex(b"*1\r\n$5\r\nMULTI\r\n", 0, slots)
    end = b"*1\r\n$4\r\nEXEC\r\n"
    exec_end = grown.index(end, slots) + len(end)
    keep = {"before": multi, "inside": (multi + exec_end) // 2, "after": exec_end}[cut]
    os.truncate(aof, before + keep)
    own_redis.start()
    assert partitions_of(own_redis.url, ns) == (16 if cut == "after" else 4)

    resumed = run_cli("resume", str(path), *args(own_redis.url, ns, out), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert_exact(own_redis.url, ns, out, expected, 16 if cut == "after" else 4)
    again = run_cli("resume", str(path), *args(own_redis.url, ns, out, "--partitions", "16"),
                    cwd=REPO)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert_exact(own_redis.url, ns, out, expected, 16)


def test_a_running_orchestrator_worker_takes_the_queues_of_the_new_count(redis_url, tmp_path):
    ns, path, out = new_namespace(), tmp_path / "events.json", tmp_path / "out.txt"
    lines = LINES[:4_000]
    path.write_text("".join(f"{line}\n" for line in lines[:2_000]))
    ingest = run_cli("ingest", str(path), *args(redis_url, ns, out, "--partitions", "2"), cwd=REPO)
    assert ingest.returncode == 0, ingest.stderr
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", "--redis-url", redis_url,
         "--namespace", ns],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while listening_workers(client, Keys(ns), 2) == 0:  # (on the 2 queues, before the rescale)
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        client.close()
        path.write_text("".join(f"{line}\n" for line in lines))
        resumed = run_cli(
            "resume", str(path), "--redis-url", redis_url, "--namespace", ns, "--workers", "0",
            "--output", str(out), "--partitions", "6", cwd=REPO, timeout=60,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
    assert "listening on all their queues" in stderr
    expected_out, expected_states = reference_run(f"{line}\n" for line in lines)
    assert out.read_text() == expected_out
    assert committed_states(redis_url, ns) == expected_states


def test_a_rescale_interrupted_by_ctrl_c_says_how_to_finish_it(redis_url, tmp_path, expected):
    ns = new_namespace()
    path, out = first_run(tmp_path, redis_url, ns)
    driver = start_rescale(path, redis_url, ns, out, 16)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    hint = stderr.splitlines()[-1]
    assert partitions_of(redis_url, ns) in (4, 16)  # (the move is done, or not begun)
    # The command it prints asks for 16 partitions again: it finishes the rescale.
    command = hint.split("'")[1].split()
    assert command[:3] == ["orchestrator", "resume", str(path)], hint
    assert command[command.index("--partitions") + 1] == "16", hint
    done = run_cli(*command[1:], "--redis-url", redis_url, "--workers", "2", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert_exact(redis_url, ns, out, expected, 16)


def staged_keys(url: str, ns: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return [key for key in client.scan_iter(match=f"{ns}:*:rescale-g*", count=1000)]
    finally:
        client.close()


def steps_staged(url: str, ns: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.hget(Keys(ns).meta, moving.STEPS) or 0)
    finally:
        client.close()


def stop_in_its_steps(driver: subprocess.Popen, url: str, ns: str, steps: int) -> None:
    """SIGSTOP the rescaling driver once it has staged ``steps`` steps, before its last."""
    deadline = time.monotonic() + 60
    while steps_staged(url, ns) < steps:
        assert driver.poll() is None and time.monotonic() < deadline, "the rescale ended first"
        time.sleep(0.002)
    os.kill(driver.pid, signal.SIGSTOP)
    assert partitions_of(url, ns) == 4, "stopped after its last step"


def test_a_rescale_killed_in_its_steps_leaves_the_old_count_and_the_next_run_cleans_up(
    redis_url, tmp_path, expected
):
    ns = new_namespace()
    path, out = first_run(tmp_path, redis_url, ns)
    driver = start_rescale(path, redis_url, ns, out, 16)
    stop_in_its_steps(driver, redis_url, ns, 2)
    driver.kill()
    driver.communicate()
    assert staged_keys(redis_url, ns)  # (what it staged is there, named after its run)
    committed_states(redis_url, ns)  # (every key in its partition of the 4)
    where = ["--redis-url", redis_url, "--namespace", ns]
    time.sleep(2.5)  # (its lock expires: then no driver runs)
    report = status(where, REPO)
    shown = report["rescale"]
    assert report["driver"] is None and shown["to_partitions"] == 16, report
    assert shown["steps_staged"] >= 2, shown
    assert not shown["running"]
    text = run_cli("status", *where, cwd=REPO).stdout
    assert "a rescale to 16 stopped before its end" in text, text
    done = run_cli("resume", str(path), *args(redis_url, ns, out), cwd=REPO, env=SHORT_LOCK)
    assert done.returncode == 0, done.stderr
    assert_exact(redis_url, ns, out, expected, 4)
    assert staged_keys(redis_url, ns) == []
    assert status(where, REPO)["rescale"] is None


def test_a_redis_that_lost_some_of_a_rescales_steps_under_it_stops_it(
    own_redis, tmp_path, expected
):
    # The driver is paused in its steps; Redis restarts from an append-only file whose last
    # step is cut off (a lost tail); the driver wakes up and goes on with its steps.
    ns = new_namespace()
    path, out = first_run(tmp_path, own_redis.url, ns)
    driver = start_rescale(path, own_redis.url, ns, out, 16)
    stop_in_its_steps(driver, own_redis.url, ns, 3)
    try:
        shown = status(["--redis-url", own_redis.url, "--namespace", ns], REPO)["rescale"]
        assert shown["running"] and shown["to_partitions"] == 16, shown
        own_redis.kill()
        aof = aof_path(own_redis.directory)
        with open(aof, "rb") as f:
            grown = f.read()
        last_step = grown.rindex(b"\r\n$13\r\nrescale_steps\r\n")
        os.truncate(aof, grown.rindex(b"*1\r\n$5\r\nMULTI\r\n", 0, last_step))
        own_redis.start()
    finally:
        os.kill(driver.pid, signal.SIGCONT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 3, stderr
    one_line_error(stderr, "Redis lost part of the rescale", "nothing was moved",
                   f"'orchestrator resume {path} --namespace {ns} --partitions 16 --output {out}' "
                   f"continues after epoch {FIRST_RUN - 1}")  # fmt: skip
    assert partitions_of(own_redis.url, ns) == 4

    done = run_cli("resume", str(path), *args(own_redis.url, ns, out, "--partitions", "16"),
                   cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_exact(own_redis.url, ns, out, expected, 16)
    assert staged_keys(own_redis.url, ns) == []
