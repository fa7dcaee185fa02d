"""Output ordering across partitions, and reading input from a byte offset."""

import io

import pytest

from orchestrator.output import OutputMerger
from orchestrator.reader import InputError, read_lines, seek_epoch


def test_lines_are_released_in_epoch_order_only_up_to_the_committed_epoch():
    m = OutputMerger()
    m.add(1, [(1, "1 b"), (4, "4 b")])
    m.add(0, [(0, "0 a"), (2, "2 a"), (3, "3 a")])
    assert m.pop_through(2) == ["0 a", "1 b", "2 a"]
    m.add(2, [(5, "5 c")])
    assert m.pop_through(10) == ["3 a", "4 b", "5 c"]
    assert m.pop_through(10) == []


def test_lines_from_a_stopping_epoch_on_are_dropped():
    m = OutputMerger()
    m.add(0, [(0, "0"), (3, "3")])
    m.add(1, [(1, "1"), (2, "2")])
    m.drop_from(2)
    assert m.pop_through(9) == ["0", "1"]


def test_reading_from_an_offset_numbers_lines_from_its_epoch():
    data = b'{"a": 1}\n\n{"b": 2}\r\nlast'
    f = io.BytesIO(data)
    lines = list(read_lines(f, 0, 0))
    assert [(x.epoch, x.offset, x.end) for x in lines] == [
        (0, 0, 9),
        (1, 9, 10),
        (2, 10, 20),
        (3, 20, 24),
    ]
    resumed = list(read_lines(f, 2, 10))
    assert [(x.epoch, x.data) for x in resumed] == [(2, b'{"b": 2}\r\n'), (3, b"last")]


def test_seek_epoch_counts_forward_from_a_known_position():
    f = io.BytesIO(b"a\nbb\nccc\n")
    assert seek_epoch(f, "f", 0, 0, 2) == 5
    assert seek_epoch(f, "f", 1, 2, 3) == 9
    with pytest.raises(InputError, match="has only 3 lines"):
        seek_epoch(f, "f", 0, 0, 4)
    with pytest.raises(InputError, match="shorter"):
        seek_epoch(f, "f", 5, 100, 5)
