"""Output ordering across partitions, and reading input from a byte offset."""

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import InputError
from orchestrator.output import OutputMerger
from orchestrator.reader import finish_oversized, seek_epoch


def test_lines_are_released_in_epoch_order_only_up_to_the_committed_epoch():
    m = OutputMerger()
    m.add(1, [1, 4], ["1 b", "4 b"])
    m.add(0, [0, 2, 3], ["0 a", "2 a", "3 a"])
    assert m.pop_through(2) == ["0 a", "1 b", "2 a"]
    m.add(2, [5], ["5 c"])
    assert m.pop_through(10) == ["3 a", "4 b", "5 c"]
    assert m.pop_through(10) == []


def test_lines_from_a_stopping_epoch_on_are_dropped():
    m = OutputMerger()
    m.add(0, [0, 3], ["0", "3"])
    m.add(1, [1, 2], ["1", "2"])
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


FIGURES = {"read": 1_500, "committed": 1_200, "committed_epoch": 1_199, "in_flight": 3}


def test_the_progress_line_shows_on_a_terminal_only():
    from orchestrator.progress import Progress

    shown = Terminal()
    Progress(enabled=True, stream=shown).update(**FIGURES, committed_offset=0)
    assert "committed through epoch 1,199" in shown.getvalue()
    assert "3 batches in flight" in shown.getvalue()
    silent = io.StringIO()  # not a terminal
    Progress(enabled=True, stream=silent).update(**FIGURES, committed_offset=0)
    quiet = Terminal()
    Progress(enabled=False, stream=quiet).update(**FIGURES, committed_offset=0)  # --quiet
    assert silent.getvalue() == quiet.getvalue() == ""


class Clock:
    """A stand-in for the time module: monotonic() is what the test says."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


def test_the_progress_line_of_a_file_shows_the_share_committed_the_committed_rate_and_eta(
    monkeypatch,
):
    from orchestrator import progress

    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    shown = Terminal()
    line = progress.Progress(enabled=True, stream=shown)
    line.start(offset=1_000, total=11_000)  # a resume from byte 1,000 of 11,000
    clock.now += 2.0
    # 2,000 events committed in 2 s (more were read: the rate is the committed one), and
    # 4,000 bytes: the 6,000 bytes left take 3 s more
    line.update(**{**FIGURES, "read": 9_000, "committed": 2_000}, committed_offset=5_000)
    assert "45.5% committed (through epoch 1,199), 1,000 events/s, ETA 0:00:03" in shown.getvalue()


def test_the_progress_line_of_live_input_shows_the_committed_rate_and_the_lag(monkeypatch):
    from orchestrator import progress

    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    shown = Terminal()
    line = progress.Progress(enabled=True, stream=shown)
    line.start(offset=0, total=None)  # followed, or a pipe: no end to count towards
    clock.now += 4.0
    line.update(**{**FIGURES, "read": 1_500, "committed": 1_000}, committed_offset=9_000)
    text = shown.getvalue()
    assert "committed through epoch 1,199, 250 events/s, lag 500 events" in text
    assert "%" not in text and "ETA" not in text


def test_the_rate_of_the_progress_line_is_over_its_last_seconds(monkeypatch):
    from orchestrator import progress

    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    shown = Terminal()
    line = progress.Progress(enabled=True, stream=shown)
    line.start(offset=0, total=None)
    for second in range(1, 31):  # 100 events/s for 20 s, then 1,000 events/s for 10 s
        clock.now += 1.0
        committed = 100 * min(second, 20) + 1_000 * max(0, second - 20)
        line.update(**{**FIGURES, "read": committed, "committed": committed}, committed_offset=0)
    last = shown.getvalue().rsplit("\r", 1)[1]
    assert last.startswith("committed through epoch 1,199, 1,000 events/s,"), last


def test_the_progress_line_is_cut_to_the_terminals_width():
    import fcntl
    import pty
    import struct
    import termios

    from orchestrator.progress import Progress

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        Progress(enabled=True, stream=terminal).update(**FIGURES, committed_offset=0)
    shown = os.read(master, 4096)
    os.close(master)
    # a line that wrapped would not be rewritten in place: 39 columns and the erasure
    assert shown == b"\r" + b"committed through epoch 1,199, 0 events/s, lag 300 events"[:39] + (
        b"\x1b[K"
    )


def test_a_file_size_is_known_only_for_input_read_to_its_end(tmp_path):
    from orchestrator.progress import input_size

    (tmp_path / "in.json").write_bytes(b"{}\n" * 7)
    with open(tmp_path / "in.json", "rb") as f:
        assert input_size(f, follow=False) == 21
        assert input_size(f, follow=True) is None  # followed: it grows
    read, write = os.pipe()
    with os.fdopen(read, "rb") as f, os.fdopen(write, "wb"):
        assert input_size(f, follow=False) is None


def test_the_merger_counts_the_lines_it_holds():
    m = OutputMerger()
    m.add(0, [0, 3], [b"0", b"3"])
    m.add(1, [1, 2, 5], [b"1", b"2", b"5"])
    assert m.held == 5
    m.pop_through(1)
    assert m.held == 3
    m.drop_from(3)
    assert m.held == 1
    m.pop_through(9)
    assert m.held == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(  # notices: (partition, how many lines, epochs to skip before each)
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2), max_size=6)), max_size=12
    ),
    st.lists(st.integers(-1, 40), max_size=6),
)
def test_the_merger_releases_what_a_stable_sort_of_all_lines_by_epoch_gives(notices, pops):
    """A line of a flat_map may share its epoch with others, in several partitions: lines
    of one epoch come out in the order their partitions first gave lines, each in order."""
    m, last, given_lines, first_seen = OutputMerger(), {}, [], []
    for p, gaps in notices:
        epochs = []
        for gap in gaps:
            last[p] = last.get(p, 0) + gap
            epochs.append(last[p])
        lines = [f"{e} p{p} #{len(given_lines) + i}" for i, e in enumerate(epochs)]
        given_lines += [(e, p, line) for e, line in zip(epochs, lines, strict=True)]
        if lines and p not in first_seen:
            first_seen.append(p)
        m.add(p, epochs, lines)
    out = []
    for through in [*pops, 99]:
        out += m.pop_through(through)
    rank = {p: i for i, p in enumerate(first_seen)}
    expected = [line for _, _, line in sorted(given_lines, key=lambda x: (x[0], rank[x[1]]))]
    assert out == expected and m.held == 0
