"""The commit protocol, on fakeredis and on a real redis-server."""

import json
import zlib

import orjson
import pytest
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

import tasks.jobs
import tasks.store
from tasks.apply import apply_events
from tasks.batch import Batch, CommitNotice
from tasks.cartjoin import FLOW_PATH
from tasks.errors import OutOfOrder
from tasks.flow import load_flow
from tasks.jobs import run_batch
from tasks.keys import PROCESS_BATCH
from tasks.store import CommitOutcome, applied_epochs, claim_partition, restore_partition

from reference import reference_run

SEED_LINES = [
    '{"user_id": "a", "type": "order", "order_id": 1}',
    '{"user_id": "a", "type": "order", "order_id": 2}',
    '{"user_id": "b", "type": "order", "order_id": 3}',
    '{"user_id": "a", "type": "payment", "order_id": 2}',
    '{"user_id": "b", "type": "order", "order_id": 4}',
    '{"user_id": "a", "type": "payment", "order_id": 1}',
    '{"user_id": "b", "type": "payment", "order_id": 4}',
]


def start(r, keys, generation=1):
    """What a run does first: own the namespace, then claim its partition."""
    r.hset(keys.meta, mapping={"generation": generation, "partitions": 1, "flow": FLOW_PATH})
    claim_partition(r, keys, 0, generation)


def batch(keys, lines, after, last, first_epoch=None, generation=1, on_error="fail"):
    first = after + 1 if first_epoch is None else first_epoch
    epochs = list(range(first, first + len(lines)))
    raw = [line.encode() for line in lines]
    return Batch(keys.namespace, generation, 0, 1, after, last, FLOW_PATH, on_error, epochs, raw)


def states(r, keys, p=0):
    return {k.decode(): orjson.loads(v) for k, v in r.hgetall(keys.state(p)).items()}


def notices(r, keys, generation=1, partition=0):
    return [CommitNotice.decode(f[b"n"]) for _, f in r.xrange(keys.notices(generation, partition))]


def snapshot(r, keys):
    """Every key of the namespace with its full contents."""
    out = {}
    for key in sorted(r.scan_iter(match=keys.pattern)):
        kind = r.type(key)
        if kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            out[key] = r.xrange(key)
        else:
            out[key] = r.get(key)
    return out


def test_a_batch_commits_state_progress_undo_and_its_lines_together(r, keys):
    start(r, keys)
    assert run_batch(r, batch(keys, SEED_LINES[:3], -1, 2))["outcome"] == "committed"
    assert states(r, keys) == {
        "a": {"unpaid_order_ids": [1, 2], "paid_order_ids": []},
        "b": {"unpaid_order_ids": [3], "paid_order_ids": []},
    }
    assert applied_epochs(r, keys, 1) == [2]
    [notice] = notices(r, keys)
    assert notice.epochs == [0, 1, 2]
    assert notice.lines[2] == b'2 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3]}'
    assert sorted(r.scan_iter(match=keys.pattern)) == sorted(
        k.encode()
        for k in [keys.meta, keys.progress(0), keys.state(0), keys.undo(0), keys.notices(1, 0)]
    )


def test_a_retried_batch_is_not_applied_twice(r, keys):
    start(r, keys)
    b = batch(keys, SEED_LINES[:4], -1, 3)
    run_batch(r, b)
    before = snapshot(r, keys)
    # A retry, a duplicate delivery: nothing changes, no second notice.
    assert run_batch(r, b)["outcome"] == "duplicate"
    assert snapshot(r, keys) == before
    assert len(notices(r, keys)) == 1


def test_a_batch_of_a_superseded_run_writes_nothing(r, keys):
    start(r, keys, generation=2)
    before = snapshot(r, keys)
    assert run_batch(r, batch(keys, SEED_LINES[:2], -1, 1, generation=1))["outcome"] == "stale"
    assert snapshot(r, keys) == before


def test_a_batch_before_its_predecessor_is_refused_and_writes_nothing(r, keys):
    start(r, keys)
    before = snapshot(r, keys)
    with pytest.raises(OutOfOrder, match="needs it at epoch 2"):
        run_batch(r, batch(keys, SEED_LINES[3:5], 2, 4))
    assert snapshot(r, keys) == before


def apply_under_watch(r, keys, b):
    """Load and apply a batch as a worker does, stopping just before its commit."""
    txn_context = tasks.store.partition_transaction(r, keys, b.partition)
    txn = txn_context.__enter__()
    events = tasks.jobs.batch_events(b)
    loaded = txn.load(list(dict.fromkeys(key for _, key, _ in events)))
    applied = apply_events(load_flow(b.flow), events, loaded.states, b.last_epoch, b.on_error)
    target = tasks.store.CommitTarget(keys, b.generation, b.partition, b.after_epoch, b.last_epoch)
    return txn_context, txn, target, applied


def test_a_copy_that_loses_the_race_to_commit_writes_nothing(r, keys):
    start(r, keys)
    b = batch(keys, SEED_LINES[:4], -1, 3)
    context, slow_copy, target, applied = apply_under_watch(r, keys, b)
    # Another worker runs the same batch (a re-sent job) and commits first.
    assert run_batch(r, b)["outcome"] == "committed"
    after_first = snapshot(r, keys)
    assert slow_copy.commit(target, applied, b"notice") is CommitOutcome.DUPLICATE
    context.__exit__(None, None, None)
    assert snapshot(r, keys) == after_first
    assert len(notices(r, keys)) == 1


def test_a_new_run_claiming_the_partition_fences_a_batch_about_to_commit(r, keys):
    start(r, keys)
    context, old_run, target, applied = apply_under_watch(
        r, keys, batch(keys, SEED_LINES[:2], -1, 1)
    )
    start(r, keys, generation=2)
    before = snapshot(r, keys)
    assert old_run.commit(target, applied, b"notice") is CommitOutcome.STALE
    context.__exit__(None, None, None)
    assert snapshot(r, keys) == before


def test_a_job_that_dies_before_its_commit_leaves_no_trace(r, keys, monkeypatch):
    start(r, keys)
    run_batch(r, batch(keys, SEED_LINES[:2], -1, 1))
    before = snapshot(r, keys)

    def die(*args, **kwargs):
        raise ConnectionError("killed before the commit")

    monkeypatch.setattr(tasks.store.PartitionTransaction, "commit", die)
    with pytest.raises(ConnectionError):
        run_batch(r, batch(keys, SEED_LINES[2:5], 1, 4))
    assert snapshot(r, keys) == before
    monkeypatch.undo()
    # The re-run then applies it exactly once.
    run_batch(r, batch(keys, SEED_LINES[2:5], 1, 4))
    expected_out, expected_states = reference_run(SEED_LINES[:5])
    assert states(r, keys) == expected_states


@pytest.mark.parametrize("restore_to", [-1, 0, 1, 2, 3, 4, 5, 6])
def test_restore_gives_the_state_as_of_any_epoch(r, keys, restore_to):
    start(r, keys)
    run_batch(r, batch(keys, SEED_LINES[:3], -1, 2))
    run_batch(r, batch(keys, SEED_LINES[3:6], 2, 5))
    run_batch(r, batch(keys, SEED_LINES[6:], 5, 6))
    restore_partition(r, keys, 0, restore_to)
    _, expected = reference_run(SEED_LINES[: restore_to + 1])
    assert states(r, keys) == expected
    assert applied_epochs(r, keys, 1) == [restore_to]
    # Processing again from there gives the same end state as a run that never stopped.
    start(r, keys, generation=2)
    run_batch(r, batch(keys, SEED_LINES[restore_to + 1 :], restore_to, 6, generation=2))
    assert states(r, keys) == reference_run(SEED_LINES)[1]


def test_a_deleted_state_stays_deleted_after_restore(r, keys):
    start(r, keys)
    run_batch(r, batch(keys, SEED_LINES[:1], -1, 0))
    restore_partition(r, keys, 0, -1)
    assert states(r, keys) == {}


def test_rq_runs_the_batch_job_with_the_json_serializer(fake, keys):
    start(fake, keys)
    queue = Queue(keys.queue_name(0), connection=fake, serializer=JSONSerializer)
    b = batch(keys, SEED_LINES, -1, 6)
    batch_key = keys.batch(1, 0, 6)
    fake.set(batch_key, b.encode())
    job = queue.enqueue(PROCESS_BATCH, keys.namespace, 0, batch_key, job_id=keys.job_id(1, 0, 6))
    # The job and the batch are plain JSON in Redis: nothing needs unpickling.
    func, _, args, _ = json.loads(zlib.decompress(fake.hget(f"rq:job:{job.id}", "data")))
    assert (func, args) == (PROCESS_BATCH, [keys.namespace, 0, batch_key])
    assert Batch.decode(fake.get(batch_key)).encode() == b.encode()
    SimpleWorker([queue], connection=fake, serializer=JSONSerializer).work(burst=True)
    assert job.get_status() == "finished"
    assert states(fake, keys) == reference_run(SEED_LINES)[1]
    assert fake.get(batch_key) is None  # the commit deleted the stored batch
