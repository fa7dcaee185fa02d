"""Output ordering across partitions, and reading input from a byte offset."""

import io

import pytest

from orchestrator.errors import InputError
from orchestrator.output import OutputMerger
from orchestrator.reader import finish_oversized, seek_epoch


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


def test_an_oversized_line_is_skipped_to_its_end_and_reported():
    f = io.BytesIO(b"x" * 50 + b"\nnext\n")
    start = f.readline(11)  # the driver reads at most the limit + 1 bytes of a line
    data, size, reason, ended = finish_oversized(f, start, 10)
    assert (data, size, ended) == (b"x" * 11, 51, True)
    assert reason == "line is 51 bytes, over the 10-byte limit"
    assert f.readline() == b"next\n"  # the next line starts where it should


def test_an_oversized_last_line_without_newline_is_said_to_be_unterminated():
    f = io.BytesIO(b"x" * 30)  # (perhaps still being written: a resume reads it again)
    data, size, _, ended = finish_oversized(f, f.readline(11), 10)
    assert (data, size, ended) == (b"x" * 11, 30, False)


def test_seek_epoch_counts_forward_from_a_known_position():
    f = io.BytesIO(b"a\nbb\nccc\n")
    assert seek_epoch(f, "f", 0, 0, 2) == 5
    assert seek_epoch(f, "f", 1, 2, 3) == 9
    with pytest.raises(InputError, match="has only 3 lines"):
        seek_epoch(f, "f", 0, 0, 4)
    with pytest.raises(InputError, match="shorter"):
        seek_epoch(f, "f", 5, 100, 5)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_line_shows_on_a_terminal_only():
    from orchestrator.progress import Progress

    shown = Terminal()
    Progress(enabled=True, stream=shown).update(1_500, 1_200, 1_499, 3)
    assert "1,500 events read, committed through epoch 1,200 (lag 299 epochs)" in shown.getvalue()
    assert "batches in flight" in shown.getvalue()
    silent = io.StringIO()  # not a terminal
    Progress(enabled=True, stream=silent).update(1, 0, 0, 0)
    quiet = Terminal()
    Progress(enabled=False, stream=quiet).update(1, 0, 0, 0)  # --quiet
    assert silent.getvalue() == quiet.getvalue() == ""


def test_the_merger_counts_the_lines_it_holds():
    m = OutputMerger()
    m.add(0, [(0, b"0"), (3, b"3")])
    m.add(1, [(1, b"1"), (2, b"2"), (5, b"5")])
    assert m.held == 5
    m.pop_through(1)
    assert m.held == 3
    m.drop_from(3)
    assert m.held == 1
    m.pop_through(9)
    assert m.held == 0
