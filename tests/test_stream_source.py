"""A Redis stream as the input: its entries read as lines, the position (last entry id and its
index) that goes with every committed epoch, and the checks that refuse lost entries.

Unit tests on fakeredis (the ``fake`` fixture); tests/test_stream_input.py runs the CLI on
real servers (Redis 6.2 and 7).
"""

import pytest

from orchestrator.commands import plan_stream_start
from orchestrator.namespace import Checkpoint, Committer, checkpoint_at_or_before, read_info
from orchestrator.namespace import start_run as begin_run
from orchestrator.streamsource import (
    Position,
    StreamInfo,
    StreamInput,
    StreamLost,
    check_position,
    lag,
    predecessor,
    successor,
)
from tasks.errors import NamespaceError, Superseded
from tasks.keys import Keys

TOKEN = "host:1:abcd"


def add(r, key, *events, field="event"):
    return [r.xadd(key, {field: e}).decode() for e in events]


def read_all(source):
    lines = []
    while line := source.readline():
        lines.append(line)
    return lines


def opened(r, key="in", **kwargs):
    source = StreamInput(r, key, **kwargs)
    source.open()
    return source


def test_each_entry_is_one_line_and_offsets_count_the_bytes_of_the_lines(fake):
    ids = add(fake, "in", '{"a": 1}', "", '{"b": 22}')
    source = opened(fake)
    assert read_all(source) == [b'{"a": 1}\n', b"\n", b'{"b": 22}\n']
    assert source.ended
    # the position after each entry is found by the offset where its line ends
    assert source.position_at(0) == Position(predecessor(ids[0]), 0)
    assert source.position_at(9) == Position(ids[0], 1)
    assert source.position_at(10) == Position(ids[1], 2)
    assert source.position_at(21) == Position(ids[2], 3)


def test_a_run_without_follow_ends_at_the_newest_entry_as_of_its_start(fake):
    add(fake, "in", "1", "2")
    source = opened(fake)
    add(fake, "in", "3")
    assert read_all(source) == [b"1\n", b"2\n"]
    assert source.ended


def test_a_followed_stream_is_read_as_entries_arrive_and_never_ends(fake):
    add(fake, "in", "1")
    source = opened(fake, follow=True)
    assert read_all(source) == [b"1\n"]
    assert source.readline() == b""
    assert not source.ended
    ids = add(fake, "in", "2")
    assert read_all(source) == [b"2\n"]
    assert source.position_at(4) == Position(ids[0], 2)
    assert not source.ended


def test_a_followed_ingest_waits_for_the_streams_first_entry(fake, monkeypatch):
    # (on Redis 6.2 nothing could prove that no entry came and went before the first look)
    looks = []

    def sleep(seconds):
        looks.append(seconds)
        if len(looks) == 3:
            add(fake, "in", "first")

    monkeypatch.setattr("orchestrator.streamsource.time.sleep", sleep)
    source = opened(fake, follow=True)
    assert len(looks) == 3
    assert read_all(source) == [b"first\n"]


def test_a_missing_stream_is_refused_without_follow(fake):
    with pytest.raises(Exception, match="no such stream"):
        opened(fake)


def test_a_key_of_another_type_is_refused(fake):
    fake.set("in", "x")
    with pytest.raises(Exception, match="holds a string, not a stream"):
        opened(fake)


def test_resume_reads_after_the_recorded_entry(fake):
    ids = add(fake, "in", "1", "2", "3")
    source = StreamInput(fake, "in")
    source.start_at(Position(ids[0], 1), 100)
    source.open()
    assert read_all(source) == [b"2\n", b"3\n"]
    assert source.position_at(104) == Position(ids[2], 3)


def test_entries_the_driver_must_reject_come_without_a_newline_and_say_why(fake):
    fake.xadd("in", {"other": "x"})
    add(fake, "in", "a\nb", "ends with its newline\n")
    source = opened(fake)
    first = source.readline(5)  # a rejected line comes whole, whatever the limit
    assert first == b'{"other":"x"}' and "has no field 'event'" in source.rejection
    assert source.readline() == b"a\nb" and "holds a newline" in source.rejection
    assert source.readline() == b"ends with its newline\n" and source.rejection is None


def test_another_field_holds_the_event(fake):
    add(fake, "in", "1", field="payload")
    assert read_all(opened(fake, field="payload")) == [b"1\n"]


def test_an_oversized_line_is_returned_in_parts_like_a_file_would(fake):
    add(fake, "in", "x" * 10, "y")
    source = opened(fake)
    assert source.readline(4) == b"xxxx"
    assert source.readline(100) == b"xxxxxx\n"
    assert source.position_at(11).index == 1


# ------------------------------------------------------------------- loss checks


def info(**kw):
    return StreamInfo(
        **({"length": 1, "first": "5-0", "last": "9-0", "last_generated": "9-0"} | kw)
    )


@pytest.mark.parametrize(
    ("position", "found", "lost"),
    [
        # Redis 7: counters
        (Position("4-0", 4), info(added=5, length=5, first="1-0", max_deleted="0-0"), False),
        (Position("4-0", 4), info(added=9, max_deleted="6-0"), "deleted"),  # XDEL ahead
        (Position("4-0", 4), info(added=9, length=5, max_deleted="3-0"), False),  # trimmed behind
        (Position("4-0", 4), info(added=9, length=4, first="6-0", max_deleted="0-0"), "trimmed"),
        (Position("4-0", 4), info(added=2, length=2, first="1-0", max_deleted="0-0"), "created"),
        (Position("9-0", 9), info(added=9, length=0, first=None, max_deleted="0-0"), False),
        (Position("4-0", 4), info(added=9, length=0, first=None, max_deleted="0-0"), "trimmed"),
        # Redis 6.2: no counters
        (Position("4-0"), info(first="4-0"), False),  # the position is still there
        (Position("4-5"), info(first="4-6"), False),  # nothing can lie between
        (Position("4-0"), info(first="5-0"), "cannot tell"),
        (Position("4-0"), None, "was deleted"),
    ],
)
def test_entries_lost_after_the_position_are_refused(position, found, lost):
    if not lost:
        check_position("s", position, found, started=True)
        return
    with pytest.raises(StreamLost, match=lost):
        check_position("s", position, found, started=True)


def test_an_ingest_reads_from_the_oldest_entry_and_counts_those_trimmed_before(fake):
    add(fake, "in", "1", "2", "3")
    fake.xtrim("in", maxlen=1, approximate=False)
    source = opened(fake)
    assert read_all(source) == [b"3\n"]
    assert source.position_at(2).index == 3


def test_entries_trimmed_while_a_run_reads_stop_it(fake):
    add(fake, "in", *"1234")
    source = StreamInput(fake, "in", follow=True)
    source.open()
    assert source.readline() == b"1\n"  # (fetched 1 to 4)
    read_all(source)
    add(fake, "in", "5", "6")
    fake.xtrim("in", maxlen=1, approximate=False)  # 5 goes before it is read
    assert source.readline() == b""
    assert source.ended and "trimmed" in source.stopped


# ------------------------------------------------- the position goes with the record


def test_the_position_is_recorded_with_the_committed_epoch_and_its_checkpoint(fake, keys):
    ids = add(fake, "in", "1", "2", "3")
    source = opened(fake)
    read_all(source)
    info_ = read_info(fake, keys)
    fence = begin_run(
        fake, keys, token=TOKEN, lock_ttl_ms=30_000, info=info_, partitions=1,
        flow="tasks.cartjoin:flow", input_name="redis-stream:in", start_epoch=0,
        start_offset=0, source_fields=source.fields,
    )  # fmt: skip
    committer = Committer(fake, keys, 1, fence, last_committed=-1, source_fields=source.fields)
    fake.hset(keys.progress(0), "applied", 1)
    committer.record(1, 4, [], floors=[1])
    assert read_info(fake, keys).source_position == f"{ids[1]}:2"
    # replay from epoch 2 reads after the second entry; from 0, after the one before the first
    assert checkpoint_at_or_before(fake, keys, 2) == Checkpoint(2, 4, None, f"{ids[1]}:2")
    assert checkpoint_at_or_before(fake, keys, 0).source_position == f"{predecessor(ids[0])}:0"


def test_a_record_refused_by_the_fence_records_no_position(fake, keys):
    ids = add(fake, "in", "1", "2")
    source = opened(fake)
    read_all(source)
    fence = begin_run(
        fake, keys, token=TOKEN, lock_ttl_ms=30_000, info=read_info(fake, keys), partitions=1,
        flow="tasks.cartjoin:flow", input_name="redis-stream:in", start_epoch=0,
        start_offset=0, source_fields=source.fields,
    )  # fmt: skip
    committer = Committer(fake, keys, 1, fence, last_committed=-1, source_fields=source.fields)
    fake.hset(keys.progress(0), "applied", 1)
    fake.set(keys.driver_lock, "another:2:efgh")
    with pytest.raises(Superseded):
        committer.record(1, 4, [], floors=[1])
    assert read_info(fake, keys).source_position == f"{predecessor(ids[0])}:0"


def test_the_lag_counts_the_entries_after_the_position_and_the_milliseconds_between(fake):
    for ms in (1000, 1500, 4250):
        fake.xadd("in", {"event": "1"}, id=f"{ms}-0")
    assert lag(fake, "in", Position("1000-0", 1)) == {
        "source_lag_entries": 2,
        "source_lag_seconds": 3.25,
    }
    assert lag(fake, "in", Position("4250-0", 3))["source_lag_entries"] == 0
    # a stream that is not there (another Redis): unknown, not 0
    assert lag(fake, "elsewhere", Position("1-0", 1))["source_lag_entries"] is None


def test_ids_next_to_each_other():
    assert successor("5-3") == "5-4" and predecessor("5-4") == "5-3"
    assert predecessor("5-0") == f"4-{2**64 - 1}" and successor(f"4-{2**64 - 1}") == "5-0"
    assert Position.decode(Position("7-1", None).encode()) == Position("7-1", None)


@pytest.mark.parametrize(
    ("mode", "message"),
    [("replay", "has no committed epochs"), ("resume", "has no data in this Redis")],
)
def test_a_namespace_that_does_not_exist_is_refused_as_for_a_file(fake, mode, message):
    keys = Keys("nothere")
    with pytest.raises(NamespaceError, match=message):
        plan_stream_start(fake, keys, read_info(fake, keys), mode, 3, StreamInput(fake, "in"))
