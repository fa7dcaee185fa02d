"""--output redis-stream:KEY: each committed epoch's lines are in the stream exactly once, added
by the record of the committed epoch itself; a replay rewrites the entries of its epochs.

The bookkeeping runs on fakeredis and on a real redis-server (the ``r`` fixture); the crash
test runs the CLI on a real redis-server.
"""

import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench.generate import generate
from orchestrator.errors import InputError
from orchestrator.namespace import Committer, read_info, start_run
from orchestrator.output import OutputStream
from orchestrator.sink import check_output_stream
from tasks import scripts
from tasks.errors import RedisLostData, Superseded
from tasks.keys import Keys

from conftest import REPO, cli_env, new_namespace, run_cli
from reference import reference_run

TOKEN = "host:1:abcd"


def started(r, keys, stream, *, start_epoch=None, token=TOKEN, partitions=2):
    """A run on the namespace (from its next epoch, or ``start_epoch`` as a replay would)."""
    info = read_info(r, keys)
    first = info.committed + 1 if start_epoch is None else start_epoch
    fence = start_run(
        r, keys, token=token, lock_ttl_ms=30_000, info=info, partitions=partitions,
        flow="tasks.cartjoin:flow", input_name="in.json", start_epoch=first, start_offset=0,
        output=stream.name, output_stream=stream,
    )  # fmt: skip
    committer = Committer(
        r, keys, partitions, fence, last_committed=first - 1, output_stream=stream
    )
    return fence, committer


def commit(r, keys, committer, stream, lines, through, partitions=2):
    """Partitions commit through ``through``; the driver hands their lines and records it."""
    for p in range(partitions):
        r.hset(keys.progress(p), "applied", through)
    stream.add(lines)
    committer.record(through, 0, [], floors=[through] * partitions)


def entries(r, key):
    """The stream as (epoch, output) text pairs, oldest first."""
    return [(f[b"epoch"].decode(), f[b"output"].decode()) for _, f in r.xrange(key)]


def lines_of(epochs):
    return [f'{e} {{"n": {e}}}'.encode() for e in epochs]


@pytest.fixture
def stream(keys):
    return OutputStream(f"{keys.namespace}:out")


def test_lines_reach_the_stream_with_the_record_that_commits_them_not_before(r, keys, stream):
    _, committer = started(r, keys, stream)
    stream.add(lines_of([0, 1]))
    assert r.xlen(stream.key) == 0  # held: epochs 0 and 1 are not recorded as committed yet

    commit(r, keys, committer, stream, lines_of([2]), 2)

    assert entries(r, stream.key) == [("0", '{"n": 0}'), ("1", '{"n": 1}'), ("2", '{"n": 2}')]
    assert read_info(r, keys).committed == 2
    assert read_info(r, keys).output == f"redis-stream:{stream.key}"


def test_an_epoch_keeps_its_lines_in_order_and_an_epoch_without_lines_has_no_entry(r, keys, stream):
    _, committer = started(r, keys, stream)
    commit(r, keys, committer, stream, [b'0 {"a": 1}', b'0 {"a": 2}', b'3 {"b": 1}'], 3)
    assert entries(r, stream.key) == [("0", '{"a": 1}'), ("0", '{"a": 2}'), ("3", '{"b": 1}')]


def test_a_record_refused_by_the_fence_adds_no_entries(r, keys, stream):
    _, old = started(r, keys, stream)
    r.delete(keys.driver_lock)  # the old driver was paused past its lock's TTL
    started(r, keys, OutputStream(stream.key), token="host:2:ef01")
    with pytest.raises(Superseded):
        commit(r, keys, old, stream, lines_of([0, 1]), 1)
    assert r.xlen(stream.key) == 0


def test_a_record_refused_because_redis_lost_data_adds_no_entries(r, keys, stream):
    _, committer = started(r, keys, stream)
    commit(r, keys, committer, stream, lines_of([0]), 0)
    r.hset(keys.progress(1), "applied", -1)  # a partition lost its commit
    stream.add(lines_of([1]))
    with pytest.raises(RedisLostData):
        committer.record(1, 0, [], floors=[1, 1])
    assert entries(r, stream.key) == [("0", '{"n": 0}')]


def test_a_record_sent_again_after_a_lost_reply_cannot_add_its_entries_twice(r, keys, stream):
    fence, committer = started(r, keys, stream)
    for p in range(2):
        r.hset(keys.progress(p), "applied", 1)
    record = scripts.ProgressRecord(
        meta={"committed": 1},
        output_stream=scripts.StreamEntries(stream.key, 1, ((b"0", b"x"), (b"1", b"y"))),
    )
    sent = {
        "generation": fence.generation, "token": fence.token, "lock_ttl_ms": 30_000,
        "last_committed": -1, "floors": [1, 1], "record": record,
    }  # fmt: skip
    assert scripts.record_progress(r, keys, **sent) is None
    again = scripts.record_progress(r, keys, **sent)  # the same call, as a retry sends it
    assert again is not None and again.code == "lost"
    assert entries(r, stream.key) == [("0", "x"), ("1", "y")]


def test_a_replay_deletes_the_entries_of_the_epochs_it_processes_again(r, keys, stream):
    _, committer = started(r, keys, stream)
    commit(r, keys, committer, stream, lines_of(range(700)), 699)  # more than one chunk of 256
    kept_ids = [entry_id for entry_id, _ in r.xrange(stream.key, count=123)]

    _, replay = started(r, keys, OutputStream(stream.key), start_epoch=123)

    assert [e for e, _ in entries(r, stream.key)] == [str(e) for e in range(123)]
    commit(r, keys, replay, replay.output_stream, lines_of(range(123, 130)), 129)
    rewritten = r.xrange(stream.key)
    assert [entry_id for entry_id, _ in rewritten[:123]] == kept_ids
    assert [f[b"epoch"] for _, f in rewritten] == [str(e).encode() for e in range(130)]
    # New ids, after every id the stream ever had: a reader that follows the stream sees the
    # rewritten entries as new ones, and tells them by their epoch (lower than the last seen).
    assert rewritten[123][0] > kept_ids[-1]


def test_a_run_from_epoch_0_empties_the_stream(r, keys, stream):
    _, committer = started(r, keys, stream)
    commit(r, keys, committer, stream, lines_of(range(50)), 49)
    started(r, keys, OutputStream(stream.key), start_epoch=0)
    assert r.xlen(stream.key) == 0
    assert read_info(r, keys).committed == -1


def test_a_resume_keeps_every_entry(r, keys, stream):
    _, committer = started(r, keys, stream)
    commit(r, keys, committer, stream, lines_of(range(20)), 19)
    started(r, keys, OutputStream(stream.key))  # from epoch 20
    assert [e for e, _ in entries(r, stream.key)] == [str(e) for e in range(20)]


def test_maxlen_keeps_the_newest_entries(r, keys):
    stream = OutputStream(f"{keys.namespace}:out", maxlen=5)
    _, committer = started(r, keys, stream)
    commit(r, keys, committer, stream, lines_of(range(8)), 7)
    commit(r, keys, committer, stream, lines_of(range(8, 10)), 9)
    assert [e for e, _ in entries(r, stream.key)] == ["5", "6", "7", "8", "9"]


def test_a_key_of_another_type_is_refused_and_nothing_is_recorded(r, keys, stream):
    r.set(stream.key, "someone's value")
    with pytest.raises(InputError, match="holds a string, not a stream"):
        check_output_stream(r, stream)
    with pytest.raises(InputError, match="holds a string, not a stream"):
        started(r, keys, stream)
    assert read_info(r, keys).committed == -1
    assert r.get(stream.key) == b"someone's value"


def test_a_stream_written_by_someone_else_is_refused(r, keys, stream):
    check_output_stream(r, stream)  # none yet: fine
    r.xadd(stream.key, {"event": "not ours"})
    with pytest.raises(InputError, match="not output lines of the pipeline"):
        check_output_stream(r, stream)


# ------------------------------------------------------------------------ the CLI


def stream_text(client, key):
    """The stream's entries as the output lines they stand for (``EPOCH JSON``)."""
    return "".join(f"{e} {line}\n" for e, line in entries(client, key))


@pytest.mark.integration
@pytest.mark.slow
def test_after_crashes_resumes_and_a_replay_the_stream_holds_each_epochs_line_once(
    redis_url, real, tmp_path
):
    lines = list(generate(6_000, 300, seed=15))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    key = f"{ns}:out"
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2"]
    args += ["--output", f"redis-stream:{key}"]
    args += ["--batch-events", "100"]  # small batches: the committed epoch moves all along
    command = ["ingest", str(path), *args, "--partitions", "3"]
    command += ["--flow", "tests.flows.slow_cart:flow"]
    for k in range(3):
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *command],
            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        target = 1_200 * (k + 1)
        killed_worker = False
        while int(real.hget(Keys(ns).meta, "committed") or -1) < target:
            assert driver.poll() is None, driver.stderr.read()
            if not killed_worker and k == 1:
                workers = psutil.Process(driver.pid).children()
                if workers:  # a worker dies mid-batch: the driver replaces it
                    workers[0].kill()
                    killed_worker = True
            time.sleep(0.01)
        assert int(real.hget(Keys(ns).meta, "committed")) < 5_000  # killed mid-run
        time.sleep(0.05 * k)  # somewhere after a record, before the next one
        assert killed_worker or k != 1
        driver.send_signal(signal.SIGKILL)
        out, _ = driver.communicate()
        assert out == b""  # every line went to the stream
        # Never more than the record says is committed: each entry's epoch is committed.
        committed = int(real.hget(Keys(ns).meta, "committed"))
        assert stream_text(real, key) == reference_run(lines[: committed + 1])[0]
        command = ["resume", str(path), *args]
    resumed = run_cli(*command, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == ""
    assert stream_text(real, key) == reference_run(lines)[0]

    before = real.xrange(key)
    replay = run_cli("replay", str(path), *args, "--from-epoch", "4321", cwd=REPO)
    assert replay.returncode == 0, replay.stderr
    after = real.xrange(key)
    assert stream_text(real, key) == reference_run(lines)[0]
    kept = [entry for entry in before if int(entry[1][b"epoch"]) < 4321]
    assert after[: len(kept)] == kept  # the epochs before the replay's are untouched
    assert all(entry_id > before[-1][0] for entry_id, _ in after[len(kept) :])  # rewritten
    real.delete(key)


@pytest.mark.integration
def test_output_maxlen_keeps_the_newest_lines_of_a_run(redis_url, real, tmp_path):
    lines = list(generate(800, 40, seed=3))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    key = f"{ns}:out"
    run = run_cli(
        "ingest", str(path), "--redis-url", redis_url, "--namespace", ns, "--workers", "1",
        "--output", f"redis-stream:{key}", "--output-maxlen", "100", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = reference_run(lines)[0].splitlines(keepends=True)[-100:]
    assert stream_text(real, key) == "".join(expected)
    status = run_cli("status", "--redis-url", redis_url, "--namespace", ns, cwd=tmp_path)
    assert f"redis-stream:{key}" in status.stdout
    real.delete(key)


@pytest.mark.integration
def test_a_key_that_is_not_a_stream_is_refused_before_the_run(redis_url, real, tmp_path):
    path = tmp_path / "events.json"
    path.write_text("\n".join(generate(50, 5, seed=1)) + "\n")
    ns = new_namespace()
    key = f"{ns}:out"
    real.set(key, "taken")
    run = run_cli(
        "ingest", str(path), "--redis-url", redis_url, "--namespace", ns, "--workers", "1",
        "--output", f"redis-stream:{key}", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 66
    assert run.stderr.startswith("orchestrator: --output redis-stream:") and "string" in run.stderr
    assert real.get(key) == b"taken"
    assert real.hget(Keys(ns).meta, "committed") is None
    real.delete(key)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--output-maxlen", "10"], "--output-maxlen needs --output redis-stream:KEY"),
        (["--output", "out.txt", "--output-maxlen", "10"], "--output-maxlen needs --output"),
        (["--output", "redis-stream:"], "no stream key after 'redis-stream:'"),
        (["--output", "redis-stream:k", "--output-maxlen", "0"], "must be at least 1"),
    ],
)
def test_stream_output_mistakes_are_usage_errors(tmp_path, options, message):
    path = tmp_path / "events.json"
    path.write_text("{}\n")
    run = run_cli("ingest", str(path), *options, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("orchestrator: ") and message in run.stderr
    assert not (tmp_path / ".orchestrator").exists()
