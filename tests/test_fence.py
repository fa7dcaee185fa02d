"""The fence on a driver's writes: a record is written only by the run that owns the namespace,
and only while Redis holds everything that run saw committed (fakeredis and a real server)."""

import dataclasses

import pytest
from test_store import SEED_LINES, batch

from orchestrator.dispatch import Dispatcher
from orchestrator.errors import WorkerFailed
from orchestrator.fence import Fence, check_consistency
from orchestrator.namespace import Committer, read_info, reset, start_run
from tasks.errors import RedisLostData, Superseded
from tasks.jobs import run_batch
from tasks.keys import Keys
from tasks.lease import Lease

from helpers import run_queued_jobs

TOKEN = "host:1:abcd"


def started(r, keys, partitions=2, token=TOKEN):
    info = read_info(r, keys)
    fence = start_run(
        r, keys, token=token, lock_ttl_ms=30_000, info=info, partitions=partitions,
        flow="tasks.cartjoin:flow", input_name="in.json", start_epoch=info.committed + 1,
        start_offset=0,
    )  # fmt: skip
    return fence, Committer(r, keys, partitions, fence, last_committed=info.committed)


def commit_through(r, keys, partition, epoch):
    """What a worker's commit does to a partition's progress."""
    r.hset(keys.progress(partition), "applied", epoch)


def test_a_record_is_written_when_redis_holds_what_the_driver_saw(r, keys):
    fence, committer = started(r, keys)
    commit_through(r, keys, 0, 10)
    commit_through(r, keys, 1, 12)
    committer.record(10, 500, [], floors=[10, 12])
    info = read_info(r, keys)
    assert (info.committed, info.offset, info.floors) == (10, 500, (10, 10))
    assert r.get(keys.driver_lock) == TOKEN.encode()  # the record renews the lock


def test_a_partition_behind_what_the_driver_saw_refuses_the_record(r, keys):
    _, committer = started(r, keys)
    commit_through(r, keys, 0, 10)
    commit_through(r, keys, 1, 7)  # the driver saw 12: Redis lost a commit
    with pytest.raises(RedisLostData, match="partition 1 is at epoch 7, but this driver saw it"):
        committer.record(10, 500, [], floors=[10, 12])
    assert read_info(r, keys).committed == -1  # nothing written


def test_a_committed_epoch_that_went_back_refuses_the_record(r, keys):
    _, committer = started(r, keys)
    commit_through(r, keys, 0, 20)
    commit_through(r, keys, 1, 20)
    committer.record(10, 500, [], floors=[20, 20])
    r.hset(keys.meta, "committed", 5)  # as after a restart from an older append-only file
    with pytest.raises(RedisLostData, match="committed epoch is back at 5, but this driver"):
        committer.record(15, 800, [], floors=[20, 20])
    assert read_info(r, keys).committed == 5


def test_a_newer_run_supersedes_the_old_driver(r, keys):
    _, old = started(r, keys)
    r.delete(keys.driver_lock)  # the old driver was paused past its lock's TTL
    started(r, keys, token="host:2:ef01")
    with pytest.raises(Superseded, match="another driver took over"):
        old.record(3, 100, [], floors=[-1, -1])


def test_another_lock_holder_supersedes_the_driver(r, keys):
    _, committer = started(r, keys)
    r.set(keys.driver_lock, "host:3:0000")
    with pytest.raises(Superseded, match=r"another driver holds its lock \(host:3:0000\)"):
        committer.record(-1, 0, [], floors=[-1, -1])


def test_a_lock_that_expired_is_taken_again_when_nobody_else_started(r, keys):
    _, committer = started(r, keys)
    r.delete(keys.driver_lock)
    committer.record(-1, 0, [], floors=[-1, -1])
    assert r.get(keys.driver_lock) == TOKEN.encode()


def test_a_namespace_that_is_gone_stops_the_driver(r, keys):
    _, committer = started(r, keys)
    reset(r, keys)
    with pytest.raises(RedisLostData, match="is gone from Redis"):
        committer.record(-1, 0, [], floors=[-1, -1])
    assert r.keys(f"{keys.namespace}:*") == []


def test_a_run_planned_before_another_started_is_refused(r, keys):
    info = read_info(r, keys)
    started(r, keys)  # another driver started after `info` was read
    r.delete(keys.driver_lock)
    with pytest.raises(Superseded, match="started a run"):
        start_run(
            r, keys, token="host:9:9999", lock_ttl_ms=30_000, info=info, partitions=2,
            flow="tasks.cartjoin:flow", input_name="in.json", start_epoch=0, start_offset=0,
        )  # fmt: skip


def test_start_checks_that_every_partition_holds_its_floor(r, keys):
    _, committer = started(r, keys)
    commit_through(r, keys, 0, 30)
    commit_through(r, keys, 1, 25)
    committer.record(25, 900, [], floors=[30, 25])
    floors = read_info(r, keys).floors
    check_consistency(r, keys, floors, 26)  # consistent: fine
    r.delete(keys.progress(1))  # evicted
    with pytest.raises(RedisLostData, match="partition 1 is at epoch -1, but it had applied"):
        check_consistency(r, keys, floors, 26)
    # Replaying from before what survived needs nothing of the lost part.
    check_consistency(r, keys, floors, 0)


def test_the_fence_of_a_run(r, keys):
    seconds, _ = r.time()
    fence, _ = started(r, keys)
    # A namespace's first generation is the server's time in ms, then each run adds one.
    assert seconds * 1000 <= fence.generation < (seconds + 5) * 1000
    assert fence == Fence(fence.generation, TOKEN, 30_000)
    assert [int(r.hget(keys.progress(p), "generation")) for p in range(2)] == [fence.generation] * 2
    r.delete(keys.driver_lock)
    assert started(r, keys, token="host:2:0000")[0].generation == fence.generation + 1


def test_generations_never_repeat_after_a_reset(r, keys):
    old, committer = started(r, keys)
    r.delete(keys.driver_lock)  # the old driver is paused past its lock's TTL...
    reset(r, keys)  # ...the namespace is reset and ingested again
    new, _ = started(r, keys, token="host:2:0000")
    assert new.generation > old.generation
    with pytest.raises(Superseded):
        committer.record(-1, 0, [], floors=[-1, -1])


def test_a_run_of_the_same_generation_started_by_another_driver_supersedes(r, keys):
    fence, committer = started(r, keys)
    r.hset(keys.meta, "run", "host:7:7777")  # as if the namespace were lost and started again
    r.delete(keys.driver_lock)
    with pytest.raises(Superseded, match="host:7:7777"):
        committer.record(-1, 0, [], floors=[-1, -1])


def test_reset_deletes_exactly_the_namespace_and_not_one_whose_name_extends_it(r):
    orders, prod = Keys("orders-x1"), Keys("orders-x1-prod")
    for keys in (orders, prod):
        r.hset(keys.meta, "generation", 1)
        r.rpush(keys.queue_key(0), "job")
        r.hset(f"rq:job:{keys.job_id(1, 0, 5)}", "status", "queued")
        r.zadd(f"rq:wip:{keys.queue_name(0)}", {"job": 1})
        r.sadd("rq:queues", keys.queue_key(0))
    before = sorted(k for k in r.keys("*") if b"orders-x1-prod" in k)
    try:
        reset(r, orders)
        assert [k for k in r.keys("*") if b"orders-x1" in k and b"prod" not in k] == []
        assert sorted(k for k in r.keys("*") if b"orders-x1-prod" in k) == before
        assert r.sismember("rq:queues", prod.queue_key(0))
    finally:
        reset(r, prod)
        r.srem("rq:queues", orders.queue_key(0), prod.queue_key(0))


def test_a_partition_whose_claim_is_gone_refuses_the_record(r, keys):
    _, committer = started(r, keys)
    r.delete(keys.progress(0))
    with pytest.raises(RedisLostData, match="partition 0 is back at generation -1"):
        committer.record(-1, 0, [], floors=[-1, -1])


def sent(r, keys, generation, lost_batch):
    dispatcher = Dispatcher(r, keys, generation, 1)
    flight = dispatcher.new_flight(
        lost_batch, [0] * len(lost_batch.lines), len(lost_batch.lines), 0
    )
    dispatcher.send([flight])
    dispatcher._watched_at = float("-inf")  # (it looks at once)
    return dispatcher, flight


def test_a_batch_that_found_its_partition_behind_what_the_driver_saw_is_a_loss(r, keys):
    """Even once the partition applied the lost batches again (queued before the loss, they
    came back with it and ran), when the driver's own look at its progress finds nothing amiss."""
    fence, _ = started(r, keys, partitions=1)
    g = fence.generation
    run_batch(r, batch(keys, SEED_LINES[:2], -1, 1, generation=g))
    # The driver saw the partition commit through epoch 4 and sent the batch after it; then
    # Redis came back with the partition at epoch 1.
    dispatcher, flight = sent(r, keys, g, batch(keys, SEED_LINES[5:], 4, 6, generation=g))
    run_queued_jobs(r, keys, 1)
    run_batch(r, batch(keys, SEED_LINES[2:5], 1, 4, generation=g))  # the lost batch, again
    lost = "partition 0 is at epoch 1, but this driver saw it commit through epoch 4"
    with pytest.raises(RedisLostData, match=lost):
        dispatcher.watch({0: flight})


def test_a_batch_job_that_fails_otherwise_is_a_worker_failure(r, keys):
    fence, _ = started(r, keys, partitions=1)
    g = fence.generation
    broken = dataclasses.replace(
        batch(keys, SEED_LINES[:2], -1, 1, generation=g), flow="tests.flows.no_such_module:flow"
    )
    dispatcher, flight = sent(r, keys, g, broken)
    run_queued_jobs(r, keys, 1)
    with pytest.raises(
        WorkerFailed, match=r"a worker failed on job .* \(partition 0 epochs 0..1\): "
    ):
        dispatcher.watch({0: flight})


def test_a_paused_job_that_wakes_up_does_not_take_its_partitions_lease_back(r, keys):
    stale = Lease(r, keys.lease(0), "ns-g1-p0-e99")
    stale.renew()
    r.set(keys.lease(0), "ns-g2-p0-e99", px=3000)  # the newer run's job took it meanwhile
    stale.renew()  # the old job's lease thread, woken up
    assert r.get(keys.lease(0)) == b"ns-g2-p0-e99" and stale.lost
    stale.renew()
    assert r.get(keys.lease(0)) == b"ns-g2-p0-e99"
    mine = Lease(r, keys.lease(1), "ns-g2-p1-e5")
    mine.renew()  # (a lease nobody holds, or this job's own, is renewed)
    mine.renew()
    assert r.get(keys.lease(1)) == b"ns-g2-p1-e5" and 0 < r.pttl(keys.lease(1)) <= 3000
    assert not mine.lost
