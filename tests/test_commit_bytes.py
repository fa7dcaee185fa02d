"""Commits bounded by bytes: a hot key's batch commits in parts, each ending with an epoch;
a commit Redis would refuse is refused with a reason, not tried again forever."""

import json

import pytest
from test_store import batch, notices, snapshot, start, states

import orchestrator.dispatch
import tasks.jobs
import tasks.store
from bench.generate import generate
from orchestrator.dispatch import Dispatcher
from tasks.errors import CommitTooLarge
from tasks.jobs import run_batch
from tasks.keys import Keys
from tasks.store import applied_epochs, restore_partition
from tasks.tuning import COMMIT_BYTES_ENV

from conftest import REPO, cli_env, new_namespace, run_cli
from model import cart_model
from reference import reference_run

# One user's orders: each output line and state carries all of them (a hot key).
HOT = [json.dumps({"user_id": "hot", "type": "order", "order_id": i}) for i in range(1, 41)]
LINES = [*HOT[:20], '{"user_id": "b", "type": "order", "order_id": 99}', *HOT[20:]]


def expected_lines(lines):
    out, _ = reference_run(lines)
    return [line.encode() for line in out.splitlines()]


def test_a_batch_over_the_bound_commits_in_parts_that_end_with_epochs(fake, keys, monkeypatch):
    monkeypatch.setenv(COMMIT_BYTES_ENV, "2000")
    start(fake, keys)
    b = batch(keys, LINES, -1, len(LINES) + 4)  # (a batch may end after its last line)
    assert run_batch(fake, b)["outcome"] == "committed"
    parts = notices(fake, keys)
    assert len(parts) >= 5
    # Each part ends with an epoch, the last one with the batch's; together they are the
    # batch's lines, once each.
    throughs = [n.applied_through for n in parts]
    assert throughs == sorted(set(throughs)) and throughs[-1] == b.last_epoch
    assert [line for n in parts for line in n.lines] == expected_lines(LINES)
    for n in parts:
        assert max(n.epochs) <= n.applied_through
    assert states(fake, keys) == reference_run(LINES)[1]
    assert applied_epochs(fake, keys, 1) == [b.last_epoch]
    assert not fake.exists(keys.batch(1, 0, b.last_epoch))  # deleted by the last part only
    # A copy of it (a job sent again) changes nothing.
    assert run_batch(fake, b)["outcome"] == "duplicate"
    assert len(notices(fake, keys)) == len(parts)
    # Every epoch can be restored, inside a part or at its end.
    for epoch in (throughs[1], throughs[1] - 1):
        restore_partition(fake, keys, 0, epoch)
        assert states(fake, keys) == reference_run(LINES[: epoch + 1])[1]


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_batch_sent_again_goes_on_after_the_parts_already_committed(
    fake, keys, monkeypatch, attempt
):
    monkeypatch.setenv(COMMIT_BYTES_ENV, "2000")
    start(fake, keys)
    b = batch(keys, LINES, -1, len(LINES) - 1)
    commit = tasks.store.PartitionTransaction.commit
    commits = []

    def dies_at_its_third_commit(self, target, applied, notice=b""):
        commits.append(target.after_epoch)
        if len(commits) == 3:
            raise ConnectionError("the worker died")
        return commit(self, target, applied, notice)

    monkeypatch.setattr(tasks.store.PartitionTransaction, "commit", dies_at_its_third_commit)
    with pytest.raises(ConnectionError):
        run_batch(fake, b)
    committed = applied_epochs(fake, keys, 1)[0]
    assert -1 < committed < b.last_epoch
    monkeypatch.undo()
    monkeypatch.setenv(COMMIT_BYTES_ENV, "2000")
    # The same batch again (as the driver sends it when its worker died): it starts after
    # the parts committed, and every line comes out exactly once.
    assert run_batch(fake, b, attempt=attempt)["outcome"] == "committed"
    parts = notices(fake, keys)
    assert [line for n in parts for line in n.lines] == expected_lines(LINES)
    assert states(fake, keys) == reference_run(LINES)[1]


def test_a_commit_over_what_redis_takes_in_one_argument_is_refused(fake, keys, monkeypatch):
    monkeypatch.setattr(tasks.jobs, "REDIS_MAX_ARGUMENT", 150)  # (the bound is then 75)
    start(fake, keys)
    with pytest.raises(CommitTooLarge) as refused:
        run_batch(fake, batch(keys, LINES, -1, len(LINES) - 1))
    # Refused at the first part whose one epoch is over the limit (an output line of ~150
    # bytes: the state of ~20 orders), with the parts before it committed.
    applied = applied_epochs(fake, keys, 1)[0]
    message = str(refused.value)
    assert f"partition 0 epochs {applied + 1}..{applied + 1}: its output lines take" in message
    assert f"(the output lines of epoch {applied + 1} alone 0.0 MB)" in message
    assert "more than Redis takes in one argument (proto-max-bulk-len" in message
    before = snapshot(fake, keys)
    with pytest.raises(CommitTooLarge):  # and again, writing nothing
        run_batch(fake, batch(keys, LINES, -1, len(LINES) - 1))
    assert snapshot(fake, keys) == before


def in_flight(fake, keys, monkeypatch):
    """A driver's dispatcher (looking every time, a batch lost at once) and one batch in
    flight, as sent."""
    monkeypatch.setattr(orchestrator.dispatch, "WATCH_EVERY", 0.0)
    monkeypatch.setattr(orchestrator.dispatch, "LOST_AFTER", 0.0)
    start(fake, keys)
    dispatcher = Dispatcher(fake, keys, 1, 1)
    b = batch(keys, LINES, -1, len(LINES) - 1)
    return dispatcher, dispatcher.new_flight(b, list(range(len(LINES))), len(LINES), 1000)


def test_a_batch_whose_worker_died_after_a_part_is_sent_again(fake, keys, monkeypatch):
    dispatcher, flight = in_flight(fake, keys, monkeypatch)
    # Its worker committed a part through epoch 10 (the driver took its notice), then died:
    # no lease, not queued, and the progress stays there.
    fake.hset(keys.progress(0), "applied", 10)
    flight.through = 10
    for _ in range(2):  # suspect, then lost
        dispatcher.watch({0: flight})
    assert (flight.attempt, dispatcher.reruns) == (2, 1)
    assert fake.lrange(keys.queue_key(0), 0, -1) == [flight.job_id.encode()]


@pytest.mark.integration
def test_a_hot_key_ingest_commits_in_parts_and_is_exact(redis_url, real, tmp_path):
    lines = list(generate(4_000, 200, seed=3, hot_key_orders=800))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2", "--partitions", "2",
            "--batch-events", "1000", "-v"]  # fmt: skip
    env = cli_env(**{COMMIT_BYTES_ENV: "100000"})
    run = run_cli("ingest", str(path), *args, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == cart_model([x.encode() for x in lines]).output
    # The hot key's 800 lines carry ~2.8 MB: dozens of parts, where the batches are ~6.
    commits = [x for x in run.stderr.splitlines() if x.endswith(": COMMITTED")]
    assert len(commits) > 20, commits
    assert not list(real.scan_iter(match=f"{Keys(ns).namespace}:batch:*"))


@pytest.mark.integration
def test_a_rejection_inside_a_part_stops_the_run_there_and_resume_is_exact(redis_url, tmp_path):
    lines = list(generate(3_000, 100, seed=5, hot_key_orders=600))
    cursed = json.dumps({"user_id": "hot", "type": "order", "order_id": 10**9})
    lines.insert(2_000, cursed)
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    args = ["--redis-url", redis_url, "--namespace", new_namespace(), "--workers", "2",
            "--partitions", "2", "--batch-events", "3000", "--flow", "tests.flows.picky_cart:flow",
            "-v"]  # fmt: skip
    env = cli_env(**{COMMIT_BYTES_ENV: "50000"})
    first = run_cli("ingest", str(path), *args, cwd=REPO, env=env)
    assert first.returncode == 65, first.stderr[-3000:]
    assert "(epoch 2000): ValueError: order 1000000000 is cursed" in first.stderr
    # (the hot key's lines before it, ~0.6 MB, committed in parts)
    assert len([x for x in first.stderr.splitlines() if x.endswith(": COMMITTED")]) > 10
    lines[2_000] = json.dumps({"user_id": "hot", "type": "order", "order_id": 10**9 + 1})
    path.write_text("\n".join(lines) + "\n")
    second = run_cli("resume", str(path), *args, cwd=REPO, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert first.stdout + second.stdout == cart_model([x.encode() for x in lines]).output


def test_a_lease_held_by_an_older_runs_job_does_not_keep_a_lost_batch_waiting(
    fake, keys, monkeypatch
):
    dispatcher, flight = in_flight(fake, keys, monkeypatch)
    # Its worker died; a worker of an older run, paused until now, renews its own lease on
    # the partition (its commit will be refused).
    fake.set(keys.lease(0), keys.job_id(0, 0, len(LINES) - 1), px=3000)
    for _ in range(2):  # suspect, then lost
        dispatcher.watch({0: flight})
    assert (flight.attempt, dispatcher.reruns) == (2, 1)
    # This run's own job holding the lease (any try of it) keeps it waiting.
    fake.set(keys.lease(0), flight.job_id, px=3000)
    for _ in range(3):
        dispatcher.watch({0: flight})
    assert (flight.attempt, dispatcher.reruns) == (2, 1)
