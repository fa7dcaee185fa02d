"""``redis-stream:KEY`` as the input, through the CLI on real servers: the suite's
redis-server (the embedded server's Redis 6.2) and a Redis 7 of the test's own.

A run's output equals the plain loop's over the produced events, across a killed driver and
a replay; entries lost before being read are refused (exit 66) with the state intact; a
followed stream stops within 2 s of a signal with what it read committed; and the chaos run
(a producer adding events while the pipeline follows, drivers and workers SIGKILLed) ends
with the plain loop's output and no lag.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import redis
from test_follow import killed, popen_cli, text_of, wait_for

from bench.generate import generate

from conftest import REPO, RedisServer, cli_env, new_namespace, run_cli
from reference import reference_run

pytestmark = pytest.mark.integration

REDIS_7 = "/usr/bin/redis-server"
LONG = os.environ.get("ORCHESTRATOR_LONG_TESTS") == "1"


def events(n: int, seed: int, bad_every: int = 0) -> list[str]:
    """``n`` lines: cart-join events, and every ``bad_every``-th one a line no flow accepts
    (put between the events: one in their place would leave a payment without its order)."""
    good = iter(generate(n - (n // bad_every if bad_every else 0), max(2, n // 20), seed=seed))
    return [
        "FAIL HERE" if bad_every and i % bad_every == bad_every - 1 else next(good)
        for i in range(n)
    ]


def produce(url: str, key: str, lines: list[str], tmp_path: Path) -> None:
    path = tmp_path / f"produce-{time.monotonic_ns()}.json"
    path.write_text("".join(x + "\n" for x in lines))
    run = run_cli("produce", key, str(path), "--redis-url", url, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.endswith(f"added {len(lines):,} entries to stream {key!r}\n")


def meta(url: str, ns: str) -> dict[str, str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return client.hgetall(f"{ns}:meta")
    finally:
        client.close()


def committed(url: str, ns: str) -> int:
    return int(meta(url, ns).get("committed", -1))


def require_redis_7() -> None:
    """Skip without a Redis 7 on a developer machine; in CI (CI=true) fail instead: the loss
    checks that only Redis 7 can make must never go silently unproven there."""
    if not os.path.exists(REDIS_7):
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a Redis 7 at {REDIS_7} for the stream loss checks")
        pytest.skip(f"no {REDIS_7}")


@pytest.fixture
def redis7():
    """A Redis 7 of the test's own, on a unix socket in a temporary directory."""
    require_redis_7()
    tmp = tempfile.mkdtemp(prefix="orchestrator-r7-")
    server = RedisServer(tmp)
    server.args[0] = REDIS_7
    server.start()
    yield server
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def run_args(url: str, ns: str, out: Path) -> list[str]:
    return ["--redis-url", url, "--namespace", ns, "--workers", "2", "--output", str(out)]


@pytest.mark.slow
def test_a_stream_run_killed_resumed_and_replayed_equals_the_plain_loop(redis_url, tmp_path):
    lines = events(2_000, seed=4, bad_every=700)
    ns = new_namespace()
    key, out = f"{ns}:in", tmp_path / "out.txt"
    produce(redis_url, key, lines, tmp_path)
    args = [*run_args(redis_url, ns, out), "--on-error", "skip", "--batch-events", "100"]
    driver = popen_cli(
        "ingest", f"redis-stream:{key}", *args, "--flow", "tests.flows.slow_cart:flow"
    )
    wait_for(lambda: committed(redis_url, ns) >= 700 or driver.poll() is not None)
    killed(driver)  # SIGKILL mid-run
    assert committed(redis_url, ns) < 1_999
    resumed = run_cli("resume", f"redis-stream:{key}", *args, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    expected, _ = reference_run(lines, skip_bad=True)
    assert out.read_text() == expected
    # replay reads on from the checkpoint's entry: the epochs from 1234 on, again
    replay = run_cli("replay", f"redis-stream:{key}", *args, "--from-epoch", "1234", cwd=REPO)
    assert replay.returncode == 0, replay.stderr
    assert out.read_text() == expected


def lose_xdel(client: redis.Redis, key: str, ids: list[bytes]) -> None:
    client.xdel(key, ids[-3])  # an entry not yet read


def lose_trim(client: redis.Redis, key: str, ids: list[bytes]) -> None:
    client.xtrim(key, maxlen=2, approximate=False)  # (XTRIM leaves max-deleted-entry-id as is)


def lose_recreate(client: redis.Redis, key: str, ids: list[bytes]) -> None:
    client.delete(key)
    for line in events(15, seed=8):
        client.xadd(key, {"event": line})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "lose", "message"),
    [
        ("7", lose_xdel, "entries were deleted (up to"),
        ("7", lose_trim, "8 entries were trimmed (XTRIM, MAXLEN)"),  # 18 gone, 10 read
        ("7", lose_recreate, "it was deleted and created again"),
        ("6.2", lose_trim, "Redis before 7.0 cannot tell"),
    ],
)
def test_entries_lost_before_being_read_are_refused_with_exit_66_and_the_state_intact(
    request, tmp_path, server, lose, message
):
    url = (
        request.getfixturevalue("redis7").url
        if server == "7"
        else request.getfixturevalue("redis_url")
    )
    lines = events(20, seed=6)
    ns = new_namespace()
    key, out = f"{ns}:in", tmp_path / "out.txt"
    client = redis.Redis.from_url(url)
    for line in lines[:10]:
        client.xadd(key, {"event": line})
    first = run_cli("ingest", f"redis-stream:{key}", *run_args(url, ns, out), cwd=REPO)
    assert first.returncode == 0, first.stderr
    for line in lines[10:]:
        client.xadd(key, {"event": line})
    lose(client, key, [entry_id for entry_id, _ in client.xrange(key)])
    before = meta(url, ns)
    resumed = run_cli("resume", f"redis-stream:{key}", *run_args(url, ns, out), cwd=REPO)
    assert resumed.returncode == 66, resumed.stderr
    [line] = [x for x in resumed.stderr.splitlines() if "warning" not in x]
    assert line.startswith(f"orchestrator: redis-stream:{key}: after entry ") and message in line
    assert meta(url, ns) == before
    assert out.read_text() == reference_run(lines[:10])[0]
    client.delete(key)
    client.close()


def test_a_followed_stream_stops_within_2_s_of_a_signal_and_resume_continues(redis_url, tmp_path):
    lines = events(40, seed=9)
    ns = new_namespace()
    key, out = f"{ns}:in", tmp_path / "out.txt"
    args = run_args(redis_url, ns, out)
    proc = popen_cli("ingest", f"redis-stream:{key}", *args, "--follow")
    try:
        # The stream does not exist yet: the run waits for its first entry.
        waiting = f"orchestrator: redis-stream:{key} has no entries yet: waiting for the first one"
        while (line := proc.stderr.readline()) and "warning" in line:
            pass
        assert line.rstrip("\n") == waiting
        produce(redis_url, key, lines[:30], tmp_path)
        wait_for(lambda: text_of(out).count("\n") == 30, what="the first 30 lines' output")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 2.0
        assert proc.returncode == 130, stderr
    finally:
        killed(proc)
    assert committed(redis_url, ns) == 29  # everything read is committed
    produce(redis_url, key, lines[30:], tmp_path)
    resumed = run_cli("resume", f"redis-stream:{key}", *args, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == reference_run(lines)[0]


# Adds the lines of a file to a stream in random small batches with pauses, as a live
# producer would.
PRODUCER = """
import random, sys, time, redis
url, key, path = sys.argv[1:4]
r, rng = redis.Redis.from_url(url), random.Random(11)
lines = open(path, "rb").read().splitlines()
at = 0
while at < len(lines):
    n = rng.choice([1, 5, 50, 300])
    pipe = r.pipeline(transaction=False)
    for line in lines[at : at + n]:
        pipe.xadd(key, {"event": line})
    pipe.execute()
    at += n
    time.sleep(rng.choice([0, 0.001, 0.01, 0.05]))
"""


def status_json(url: str, ns: str) -> dict:
    run = run_cli("status", "--redis-url", url, "--namespace", ns, "--json", cwd=REPO)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.slow
def test_chaos_a_producer_adds_events_while_killed_drivers_and_workers_follow_them(
    request, redis_url, tmp_path
):
    # Done-when 3 of issue 15: ORCHESTRATOR_LONG_TESTS=1 runs 100,000 events on Redis 7 with
    # four driver kills; by default 5,000 events on the suite's server with one.
    n, kills = (100_000, 4) if LONG else (5_000, 1)
    url = request.getfixturevalue("redis7").url if LONG else redis_url
    lines = events(n, seed=21, bad_every=997)
    ns = new_namespace()
    key, out, source = f"{ns}:in", tmp_path / "out.txt", tmp_path / "source.json"
    source.write_text("".join(x + "\n" for x in lines))
    args = [*run_args(url, ns, out), "--on-error", "skip", "--follow"]
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, url, key, str(source)], env=cli_env()
    )
    client = redis.Redis.from_url(url)
    try:
        for k in range(kills):
            driver = popen_cli("run", f"redis-stream:{key}", *args)
            target = (k + 1) * n // (kills + 2)
            wait_for(lambda: committed(url, ns) >= target, what=f"epoch {target}")  # noqa: B023
            workers = psutil.Process(driver.pid).children()
            if workers:
                workers[0].kill()  # a worker dies mid-run: the driver replaces it
            killed(driver)
            # status counts the entries after the committed one (the producer may add more)
            before = client.xlen(key) - committed(url, ns) - 1
            lag = status_json(url, ns)["source_lag_entries"]
            assert before <= lag <= client.xlen(key) - committed(url, ns) - 1
        driver = popen_cli("run", f"redis-stream:{key}", *args)
        assert producer.wait(timeout=600) == 0
        wait_for(lambda: committed(url, ns) == n - 1, timeout=600, what="the last epoch")
        report = status_json(url, ns)
        assert report["source_lag_entries"] == 0 and report["source_lag_seconds"] == 0
        driver.send_signal(signal.SIGINT)
        code = driver.wait(timeout=30)
        assert code == 130, driver.stderr.read()
    finally:
        killed(producer)
        killed(driver)
    assert out.read_text() == reference_run(lines, skip_bad=True)[0]
    client.delete(key)
    client.close()


@pytest.mark.slow
def test_a_stream_on_another_redis_with_a_password_never_shown(redis_url, tmp_path):
    require_redis_7()
    source = RedisServer(str(tmp_path))
    source.args = [REDIS_7, *source.args[1:], "--requirepass", "s3cret-pw"]
    source.url += "?password=s3cret-pw"
    source.start()
    try:
        lines = events(30, seed=12)
        ns = new_namespace()
        out = tmp_path / "out.txt"
        env = cli_env(ORCHESTRATOR_SOURCE_URL=source.url)  # (never in a process's argv)
        (tmp_path / "in.json").write_text("".join(x + "\n" for x in lines))
        runs = [run_cli("produce", "events", "in.json", cwd=tmp_path, env=env)]
        runs.append(
            run_cli("ingest", "redis-stream:events", *run_args(redis_url, ns, out), env=env,
                    cwd=tmp_path)
        )  # fmt: skip
        assert runs[-1].returncode == 0, runs[-1].stderr
        assert out.read_text() == reference_run(lines)[0]
        status = ["status", "--redis-url", redis_url, "--namespace", ns, "--json"]
        runs.append(run_cli(*status, cwd=tmp_path, env=env))
        report = json.loads(runs[-1].stdout)
        assert (report["source_lag_entries"], report["source_lag_seconds"]) == (0, 0)
        # without the source's URL, status cannot know the lag: unknown, not 0
        runs.append(run_cli(*status, cwd=tmp_path))
        assert json.loads(runs[-1].stdout)["source_lag_entries"] is None
        # the namespace reads the stream: a file is not its input
        runs.append(run_cli("resume", "in.json", *run_args(redis_url, ns, out), cwd=tmp_path))
        assert runs[-1].returncode == 66
        assert runs[-1].stderr.endswith(
            f"orchestrator: namespace {ns!r} reads redis-stream:events, not in.json: "
            "resume it with that\n"
        )
        assert all("s3cret" not in run.stdout + run.stderr for run in runs)
    finally:
        source.stop()


def test_entries_without_the_event_field_or_with_a_newline_in_it_are_bad_lines(
    redis_url, real, tmp_path
):
    lines = events(6, seed=13)
    ns = new_namespace()
    key, out = f"{ns}:in", tmp_path / "out.txt"
    for line in lines[:3]:
        real.xadd(key, {"payload": line})
    missing = real.xadd(key, {"event": lines[3]}).decode()  # not the field the run reads
    inner = real.xadd(key, {"payload": '{"user_id":\n"x"}'}).decode()
    for line in lines[3:]:
        real.xadd(key, {"payload": line + "\n"})  # (one trailing newline is the line's end)
    args = [*run_args(redis_url, ns, out), "--source-field", "payload"]
    run = run_cli("ingest", f"redis-stream:{key}", *args, "--on-error", "dead-letter", cwd=REPO)
    assert run.returncode == 0, run.stderr
    # epochs 3 and 4 are the bad entries: the events after them keep their positions
    assert out.read_text() == reference_run([*lines[:3], "", "", *lines[3:]])[0]
    listed = run_cli(
        "dead-letters", "--json", "--redis-url", redis_url, "--namespace", ns, cwd=REPO
    )
    letters = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [(x["epoch"], x["reason"]) for x in letters] == [
        (3, f"entry {missing} has no field 'payload'"),
        (4, f"entry {inner}: its 'payload' holds a newline"),
    ]
    real.delete(key)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("redis-stream:", "no stream key after 'redis-stream:'"),
        ("redis-stream:a//b", "a stream key that a path would change is not supported"),
    ],
)
def test_stream_input_mistakes_are_usage_errors(tmp_path, source, message):
    run = run_cli("ingest", source, cwd=tmp_path)
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / ".orchestrator").exists()  # refused before any server started


def test_entries_trimmed_under_a_followed_run_stop_it_with_exit_66_after_what_it_read(
    redis7, tmp_path
):
    url = redis7.url
    lines = events(20, seed=14)
    ns = new_namespace()
    key, out = f"{ns}:in", tmp_path / "out.txt"
    produce(url, key, lines[:10], tmp_path)
    proc = popen_cli("ingest", f"redis-stream:{key}", *run_args(url, ns, out), "--follow")
    try:
        wait_for(lambda: committed(url, ns) == 9, what="the first 10 epochs")
        client = redis.Redis.from_url(url)
        pipe = client.pipeline(transaction=True)  # the run sees all of it or none of it
        for line in lines[10:]:
            pipe.xadd(key, {"event": line})
        pipe.xtrim(key, maxlen=3, approximate=False)
        pipe.execute()
        _, stderr = proc.communicate(timeout=60)
    finally:
        killed(proc)
    assert proc.returncode == 66, stderr
    [line] = [x for x in stderr.splitlines() if "warning" not in x]
    assert "7 entries were trimmed (XTRIM, MAXLEN)" in line
    assert line.endswith("; stopped after epoch 9 (everything before committed)")
    assert committed(url, ns) == 9 and out.read_text() == reference_run(lines[:10])[0]
    client.delete(key)
    client.close()
