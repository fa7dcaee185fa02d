"""Rescaling: ``resume`` and ``replay`` with another ``--partitions`` move every key's state and
replay history to the new partitions (orchestrator/rescale.py), and the namespace goes on as if
it had always had that many.

The oracle is the plain loop (``tests/reference.py``): output and final states; and for
``state KEY --at-epoch N``, the plain loop's state after line N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis import WatchError
from test_driver_inprocess import BurstWorkers, run
from test_undo import LEDGER, LOADED, batches, fresh, ledger_events, plain_befores

from bench.generate import generate
from orchestrator import rescale as moving
from orchestrator.commands import drive
from orchestrator.lock import DriverLock
from orchestrator.namespace import read_info
from orchestrator.queries import state_of
from orchestrator.rescale import rescale
from orchestrator.settings import Settings
from tasks.apply import apply_events
from tasks.errors import RedisLostData
from tasks.keys import LEGACY_SLOTS, SLOTS, Keys, Layout
from tasks.store import claim_partition, restore_partition
from tasks.undo import decode_undo, encode_undo, split_undo

from helpers import states_in
from reference import reference_run

LINES = list(generate(6_000, 300, seed=11))
FIRST_RUN = 3_500  # lines the namespace has before the rescale
PROBED_KEYS = ["u1", "u7", "u42", "u299", "nobody"]
PROBED_EPOCHS = [0, 999, 2_345, FIRST_RUN - 1]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def options(tmp_path: Path, partitions: int | None) -> Settings:
    return Settings(
        namespace="rescale", partitions=partitions, batch_events=250, output=tmp_path / "out"
    )


def plain_state(key: str, epoch: int) -> Any:
    return reference_run(f"{line}\n" for line in LINES[: epoch + 1])[1].get(key)


def states_at(fake, epochs: list[int]) -> dict[tuple[str, int], Any]:
    keys = Keys("rescale")
    return {(k, e): state_of(fake, keys, k, e)["state"] for k in PROBED_KEYS for e in epochs}


@pytest.mark.parametrize(("before", "after"), [(4, 16), (16, 3), (4, 1), (1, 5)])
def test_a_resume_with_another_partition_count_moves_the_state_and_its_history(
    fake, tmp_path, before, after
):
    path = write(tmp_path / "events.json", LINES[:FIRST_RUN])
    run(fake, options(tmp_path, before), "ingest", path)
    history = states_at(fake, PROBED_EPOCHS)
    assert history == {(k, e): plain_state(k, e) for k, e in history}

    write(path, LINES)
    run(fake, options(tmp_path, after), "resume", path)

    output, states = reference_run(f"{line}\n" for line in LINES)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states  # (and each key in the partition of its slot)
    info = read_info(fake, Keys("rescale"))
    assert (info.partitions, info.slots, info.floors) == (after, SLOTS, (len(LINES) - 1,) * after)
    assert states_at(fake, PROBED_EPOCHS) == history

    # A replay from before the rescale: the moved history restores it, at the new count.
    run(fake, options(tmp_path, None), "replay", path, from_epoch=1_500)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states
    assert states_at(fake, PROBED_EPOCHS) == history


def test_a_replay_can_rescale_too_and_later_ones_restore_through_both_moves(fake, tmp_path):
    path = write(tmp_path / "events.json", LINES)
    run(fake, options(tmp_path, 3), "ingest", path)
    history = states_at(fake, [*PROBED_EPOCHS, 5_000])

    run(fake, options(tmp_path, 8), "replay", path, from_epoch=4_000)
    run(fake, options(tmp_path, 2), "replay", path, from_epoch=2_000)
    run(fake, options(tmp_path, None), "replay", path, from_epoch=500)

    output, states = reference_run(f"{line}\n" for line in LINES)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states
    assert read_info(fake, Keys("rescale")).partitions == 2
    assert states_at(fake, [*PROBED_EPOCHS, 5_000]) == history


def test_a_namespace_made_before_slots_and_hash_tags_is_moved_to_them_by_its_next_run(
    fake, tmp_path
):
    path = write(tmp_path / "events.json", LINES[:FIRST_RUN])
    run(fake, options(tmp_path, 4), "ingest", path)
    # What an earlier version left: keys spread by crc32 modulo 4 under names without hash
    # tags, no slot count in meta; and what a killed run of it left behind.
    keys, old = Keys("rescale"), Keys("rescale", tagged=False)
    info = read_info(fake, keys)  # (its last run still owns the partitions: rescale's condition)
    rescale(
        fake, keys, generation=info.generation, source=Layout(4, SLOTS),
        target=Layout(4, LEGACY_SLOTS, tagged=False), epoch=info.committed,
    )  # fmt: skip
    fake.hdel(keys.meta, "slots", "hash_tags")
    fake.set(old.batch(info.generation, 2, 4_000), b"stale")
    fake.xadd(old.notices(info.generation, 0), {"n": b"stale"})
    fake.rpush(old.queue_key(1), "rescale-g1-p1-e4000")
    fake.sadd("rq:queues", old.queue_key(1))
    info = read_info(fake, keys)
    assert (info.slots, info.tagged) == (LEGACY_SLOTS, False)
    history = states_at(fake, PROBED_EPOCHS)  # (read under the names it has)
    assert history == {(k, e): plain_state(k, e) for k, e in history}

    write(path, LINES[:5_000])
    run(fake, options(tmp_path, None), "resume", path)  # the same count
    info = read_info(fake, keys)
    assert (info.partitions, info.slots, info.tagged) == (4, SLOTS, True)
    assert states_in(fake, "rescale") == reference_run(f"{x}\n" for x in LINES[:5_000])[1]
    assert states_at(fake, PROBED_EPOCHS) == history
    names = {k.decode() for k in fake.scan_iter("*")}
    assert not {k for k in names if k.startswith(("rescale:p", "rescale:batch", "rescale:notices"))}
    assert old.queue_key(1) not in names
    assert old.queue_key(1).encode() not in fake.smembers("rq:queues")

    write(path, LINES)
    run(fake, options(tmp_path, 6), "resume", path)
    output, states = reference_run(f"{line}\n" for line in LINES)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states
    assert read_info(fake, keys).slots == SLOTS
    assert states_at(fake, PROBED_EPOCHS) == history


# The undo records a rescale splits and merges (tasks/undo.py, split_undo).


def by_first_letter(key: bytes) -> int:
    return 0 if key[:1] < b"d" else 1


@pytest.mark.parametrize("seed", range(6))
def test_splitting_a_record_keeps_each_keys_events_and_before_images(seed):
    events = ledger_events(seed, 80)
    record = apply_events(LEDGER, fresh(events), LOADED, 79, "skip").encode_undo()
    whole = list(decode_undo(record, lambda: LEDGER))

    parts = split_undo(record, by_first_letter)

    for q, part in parts.items():
        mine = [e for e in whole if by_first_letter(e[1].encode()) == q]
        assert list(decode_undo(part, lambda: LEDGER)) == mine
    assert sum(len(list(decode_undo(p, lambda: LEDGER))) for p in parts.values()) == len(whole)


def test_a_version_1_record_splits_into_version_1_records_and_one_that_needs_no_split_is_kept():
    record = encode_undo([3, 4, 5, 6], ["a", "x", "b", "y"], [None, b"[1]", b"{}", None])
    parts = split_undo(record, by_first_letter)
    assert list(decode_undo(parts[0])) == [(3, "a", None), (5, "b", b"{}")]
    assert list(decode_undo(parts[1])) == [(4, "x", b"[1]"), (6, "y", None)]
    assert parts[0].startswith(b"[[")  # (version 1's header)
    assert split_undo(parts[1], by_first_letter) == {1: parts[1]}


def test_restoring_a_merged_history_to_any_epoch_gives_the_plain_loops_states(r, keys):
    # Two partitions' histories whose batches interleave, merged into one: several records
    # then straddle an epoch, and each must keep its part up to it.
    events = ledger_events(3, 60)
    routes = [[e for e in events if by_first_letter(e[1].encode()) == q] for q in (0, 1)]
    raw: dict[str, bytes | None] = dict(LOADED)
    records: dict[bytes, int] = {}
    for q, sizes in [(0, [7, 9, 30]), (1, [4, 11, 30])]:
        for part in batches(routes[q], sizes):
            if part:
                applied = apply_events(LEDGER, fresh(part), raw, part[-1][0], "skip")
                raw.update(applied.writes)
                records[applied.encode_undo()] = part[-1][0]
    final = {k: v for k, v in raw.items() if v is not None}
    for epoch in [50, 33, 20, 12, 5, -1]:  # one restore after the other, each from what is left
        if epoch == 50:
            r.hset(keys.state(0), mapping=final)
            r.zadd(keys.undo(0), records)
            r.hset(keys.progress(0), "applied", 59)
            claim_partition(r, keys, 0, 1)
        restore_partition(r, keys, 0, epoch, flow=LEDGER)
        _, expected = plain_befores(fresh([e for e in events if e[0] <= epoch]), LOADED)
        assert r.hgetall(keys.state(0)) == {
            k.encode(): v for k, v in expected.items() if v is not None
        }, epoch


def test_a_record_is_split_by_the_partition_of_each_keys_utf8_bytes():
    record = encode_undo([1, 2], ["é", "z"], [None, None])
    seen: list[bytes] = []
    split_undo(record, lambda key: seen.append(key) or 0)
    assert sorted(seen) == sorted(["é".encode(), b"z"])


def test_a_run_whose_rescale_redis_lost_records_nothing(fake, tmp_path):
    # A failover to a replica that never got the rescale's EXEC: meta is back at the old
    # count while the run works with the new one.
    path = write(tmp_path / "events.json", LINES[:FIRST_RUN])
    run(fake, options(tmp_path, 4), "ingest", path)
    write(path, LINES)
    keys = Keys("rescale")

    class LosingTheRescale(BurstWorkers):
        def between_reads(self) -> None:
            fake.hset(keys.meta, "partitions", 4)
            super().between_reads()

    committed = read_info(fake, keys).committed
    with (
        open(path, "rb") as f,
        DriverLock(fake, keys) as lock,
        pytest.raises(RedisLostData, match="back at 4 partitions, but this run moved it to 8"),
    ):
        drive(
            options(tmp_path, 8), "resume", path, None, f, fake, True,
            lambda keys, partitions: LosingTheRescale(fake, keys, partitions), lock,
        )  # fmt: skip
    assert read_info(fake, keys).committed == committed


def rescaled_exactly(fake, tmp_path, before, after):
    """Ingest the first lines with ``before`` partitions, resume over all of them with
    ``after``: the plain loop's output and states, and the same history."""
    path = write(tmp_path / "events.json", LINES[:FIRST_RUN])
    run(fake, options(tmp_path, before), "ingest", path)
    history = states_at(fake, PROBED_EPOCHS)
    write(path, LINES)
    run(fake, options(tmp_path, after), "resume", path)
    output, states = reference_run(f"{line}\n" for line in LINES)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states
    assert states_at(fake, PROBED_EPOCHS) == history


def test_a_rescale_writes_in_chunks_of_bounded_count_and_bytes(fake, tmp_path, monkeypatch):
    import orchestrator.rescale

    monkeypatch.setattr(orchestrator.rescale, "WRITE_CHUNK", 7)
    monkeypatch.setattr(orchestrator.rescale, "WRITE_BYTES", 300)  # (an undo record is more)
    rescaled_exactly(fake, tmp_path, 2, 5)


def test_a_rescale_moves_the_namespace_in_steps_of_bounded_size(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(moving, "READ_KEYS", 10)
    monkeypatch.setattr(moving, "READ_BYTES", 3_000)
    monkeypatch.setattr(moving, "MAX_RECORDS", 4)
    states_read, records_read = [], []
    step = moving._Move._step

    def counting(self, read, write, any_to_write):
        found = step(self, read, write, any_to_write)
        if isinstance(found, tuple):
            states_read.append(len(found[1]))
        else:
            records_read.append(len(found))
        return found

    monkeypatch.setattr(moving._Move, "_step", counting)
    rescaled_exactly(fake, tmp_path, 3, 7)
    # ~300 keys, 10 a step; the undo records a few at a time, never more than 4
    assert sum(states_read) >= 300 and len(states_read) >= 30 and max(states_read) <= 20
    assert len(records_read) >= 6 and max(records_read) <= 4


def staged_keys(fake) -> list[bytes]:
    return [key for key in fake.keys("rescale:*") if b":rescale-g" in key]


@pytest.mark.parametrize("lost", ["a step's count", "staged states", "staged undo records"])
def test_a_rescale_whose_steps_redis_lost_moves_nothing(fake, tmp_path, monkeypatch, lost):
    # Redis comes back without the last steps it acknowledged (a lost append-only-file tail)
    # while the rescale runs: its last step must not swap in what is left.
    path = write(tmp_path / "events.json", LINES[:FIRST_RUN])
    run(fake, options(tmp_path, 4), "ingest", path)
    keys, before = Keys("rescale"), states_in(fake, "rescale")
    history_of = moving._Move.history_of

    def losing(self, p):
        history_of(self, p)
        if p == 1:
            fake.hincrby(keys.meta, moving.STEPS, -1)
            kind = {"staged states": ":state:", "staged undo records": ":undo:"}.get(lost)
            if kind is not None:
                fake.delete(next(name for name in sorted(self.staged) if kind in name))

    monkeypatch.setattr(moving._Move, "history_of", losing)
    write(path, LINES)
    with pytest.raises(RedisLostData, match="Redis lost part of the rescale.*nothing was moved"):
        run(fake, options(tmp_path, 8), "resume", path)
    assert read_info(fake, keys).partitions == 4
    assert states_in(fake, "rescale") == before
    assert staged_keys(fake) == [] and not read_info(fake, keys).staged_rescale

    monkeypatch.setattr(moving._Move, "history_of", history_of)
    run(fake, options(tmp_path, 8), "resume", path)
    output, states = reference_run(f"{line}\n" for line in LINES)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states


def test_what_a_killed_rescale_staged_is_deleted_by_the_next_run(fake, tmp_path, monkeypatch):
    path = write(tmp_path / "events.json", LINES[:FIRST_RUN])
    run(fake, options(tmp_path, 4), "ingest", path)

    def killed(self, epoch, leftovers, started):
        raise KeyboardInterrupt  # (the command dies before the last step)

    monkeypatch.setattr(moving._Move, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        run(fake, options(tmp_path, 8), "resume", path)
    assert staged_keys(fake) and read_info(fake, Keys("rescale")).staged_rescale
    monkeypatch.undo()
    write(path, LINES)
    run(fake, options(tmp_path, None), "resume", path)  # (at the old count: no rescale)
    assert staged_keys(fake) == [] and not read_info(fake, Keys("rescale")).staged_rescale
    output, states = reference_run(f"{line}\n" for line in LINES)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "rescale") == states
    assert read_info(fake, Keys("rescale")).partitions == 4


LOST_CONNECTION = WatchError("A ConnectionError occurred while watching one or more keys")


@pytest.mark.parametrize("where", ["a step, after its EXEC", "the last step, after its EXEC",
                                   "the last step, before its EXEC"])  # fmt: skip
def test_a_rescale_whose_connection_drops_does_the_step_again_and_is_exact(
    fake, tmp_path, monkeypatch, where
):
    # (redis-py raises WatchError, not ConnectionError, for a connection lost under a WATCH)
    name = "_try_step" if where.startswith("a step") else "_try_finish"
    original, dropped = getattr(moving._Move, name), []

    def dropping(self, *args):
        if not dropped:
            dropped.append(where)
            if where.endswith("before its EXEC"):
                raise LOST_CONNECTION
            original(self, *args)
            if name == "_try_step":
                self.steps -= 1  # (counted only once its reply arrives)
            raise LOST_CONNECTION  # (it was done, but its reply was lost)
        return original(self, *args)

    monkeypatch.setattr(moving._Move, name, dropping)
    rescaled_exactly(fake, tmp_path, 4, 6)
    assert dropped == [where]
    assert read_info(fake, Keys("rescale")).partitions == 6 and staged_keys(fake) == []
