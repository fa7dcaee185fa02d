"""Reading blocks of lines of the declared layout at once (``orchestrator/lineblock.py``)
buffers exactly what reading line by line does: the same lines in the same batches, with
the same epochs, offsets and sizes, and the same bad lines, wherever the blocks end."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_line_key import cart_lines

import orchestrator.lineblock as lineblock
from bench.generate import generate
from orchestrator.driver import Driver, RunResult
from orchestrator.lineblock import BlockReader
from orchestrator.progress import Progress
from orchestrator.reader import LineSource
from tasks.cartjoin import CART_LINE, FLOW_PATH
from tasks.keys import SLOTS, Keys

GOOD = [line.encode() for line in generate(400, 37, seed=3)]


def read_file(path: Path, *, blocks: bool, on_error="dead-letter", limit=200, partitions=3):
    """Read the whole file as the driver does (nothing sent): what it buffered and found."""
    driver = Driver(
        fakeredis.FakeRedis(), Keys("t"), generation=1, partitions=partitions, slots=SLOTS,
        flow_path=FLOW_PATH, on_error=on_error, out=io.BytesIO(), housekeeping=None,
        progress=Progress(enabled=False), on_commit=lambda *a, **k: None, batch_events=7,
        batch_timeout=0.0,
    )  # fmt: skip
    assert driver.blocks is not None
    if not blocks:
        driver.blocks = None
    with path.open("rb") as f:
        source = LineSource(f, 0, 0, max_line_bytes=limit)
        result = RunResult(committed=-1, next_offset=0)
        while result.failure is None and not driver._read_chunk(source, result):
            pass
    pending = {
        p: [(x.epochs, x.lines, x.offsets, x.events, x.size) for x in queue]
        for p, queue in driver.pending.items()
    }
    counts = (result.events, driver.buffered, driver.buffered_bytes, source.epoch, source.offset)
    return pending, counts, result.failure, driver.dead, driver.open_line


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(lineblock, "BLOCK_BYTES", 300)  # ~5 lines: blocks end everywhere
    monkeypatch.setattr(lineblock, "BACK_OFF_CHUNKS", 1)


odd_lines = st.one_of(
    cart_lines(),
    st.just(b""),  # a blank line
    st.sampled_from(GOOD).map(lambda line: line + b"\r"),  # a CRLF line
    st.sampled_from(GOOD).map(lambda line: line[:-1] + b" " * 300 + b"}"),  # over the limit
    st.just(json.dumps({"user_id": "x" * 250, "type": "order", "order_id": 1}).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.sampled_from(GOOD), odd_lines), max_size=60),
    st.booleans(),
    st.sampled_from(["dead-letter", "skip", "fail"]),
)
def test_blocks_buffer_what_reading_line_by_line_does(tmp_path_factory, lines, last_newline, mode):
    path = tmp_path_factory.mktemp("in") / "events.json"
    data = b"\n".join(lines) + (b"\n" if last_newline and lines else b"")
    path.write_bytes(data)
    assert read_file(path, blocks=True, on_error=mode) == read_file(
        path, blocks=False, on_error=mode
    )


def test_a_clean_input_is_read_in_blocks_with_the_same_batches(tmp_path, monkeypatch):
    path = tmp_path / "events.json"
    path.write_bytes(b"".join(line + b"\n" for line in GOOD))
    taken = []
    original = BlockReader.read

    def counting(self, *args):
        block = original(self, *args)
        taken.append(block is not None)
        return block

    monkeypatch.setattr(BlockReader, "read", counting)
    with_blocks = read_file(path, blocks=True)
    assert taken.count(True) >= len(GOOD) * 55 // 300 - 1  # (all of it, ~5 lines a block)
    assert with_blocks == read_file(path, blocks=False)


def test_a_pattern_with_several_groups_gives_the_key_group(tmp_path):
    reader = BlockReader(re.compile(b"(a)(?P<key>[a-z]+)(!)"))
    block = reader.read(io.BytesIO(b"abc!\naxy!\nad"), 0, 100)
    assert block is not None
    assert (block.lines, block.keys, block.size) == ([b"abc!", b"axy!"], [b"bc", b"xy"], 10)


def test_the_cart_pattern_over_blocks_finds_every_line_of_the_layout_once():
    reader = BlockReader(re.compile(CART_LINE))
    data = b"".join(line + b"\n" for line in GOOD[:50]) + b'{"user_id": "u1", "ty'
    f, offset, keys = io.BytesIO(data), 0, []
    while (block := reader.read(f, offset, 1000)) is not None:
        offset += block.size
        assert f.tell() == offset  # (the file is left after the block's whole lines)
        keys += block.keys
    assert keys == [json.loads(line)["user_id"].encode() for line in GOOD[:50]]
    assert f.tell() == offset == len(data) - len(b'{"user_id": "u1", "ty')
