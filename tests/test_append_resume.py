"""Property: a file that grows between runs gives the result of one clean run over its final bytes.

Hypothesis writes a final input file (valid cart events, bad lines, blank lines, lines around
and over ``--max-line-bytes``; each line ending in ``\\n`` or ``\\r\\n``; the last one perhaps
without its newline) and one to three cut points in it, drawn among every interesting place
(the start of a line, just before a ``\\r``, just before a ``\\n``, so between the ``\\r`` and
the ``\\n`` of a CRLF, and just after a newline) and anywhere at all (mid-line). The file is
written up to the first cut, ingested, grown to the next cut, resumed, and so on; after the
last append (the rest of the file) one more resume. Under each ``--on-error`` mode that
sequence must equal one clean ``ingest`` of the final file:

- output file (``--output FILE``, the same file through the sequence): byte for byte the
  clean run's file, whatever the runs in between wrote to it and cut back.
- stdout (at-least-once): each resume starts at the namespace's resume point, the first
  epoch not committed, or the committed last line that had no newline (it may have been
  cut mid-write, so it is read again, whole); nothing earlier is printed twice. Each run's
  lines before the next run's resume point, then the last run's lines, are the clean run's
  stdout byte for byte; and a line printed again is the same line both times (a line printed
  for a last line that is bad once complete is not printed again, nor taken back).
- committed state in Redis: every key's state, the committed epoch, the input offset after
  it and the unterminated last line it records, as the clean run leaves them; under
  ``dead-letter``, the same dead letters (epoch, line number, reason, raw text): none for a
  line that was bad only while half-written.
- exit status: under ``skip`` and ``dead-letter`` every run exits 0. Under ``fail`` a run may
  stop (65) at a line that is only half-written, or at a bad line; the last resume ends as
  the clean run does: 0 over a good file, or 65 at the same bad line, committed through the
  same epoch.

The clean run's own output and states are checked against ``tests/model.py``. The commands
run in this process (``helpers.run_command``: the CLI's parser and ``cli.program``, the real
driver against the integration suite's redis-server, each batch job run by a thread worker),
since a CLI subprocess costs ~0.5 s and this property tries 200 files.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from orchestrator.namespace import read_info, reset
from tasks.keys import Keys

from conftest import new_namespace
from helpers import CommandRun, committed_states, run_command
from model import cart_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = 200


def _dump(value: object) -> bytes:
    return json.dumps(value).encode()


USERS = st.sampled_from(["a", "b", "c"])
TYPES = st.sampled_from(["order", "payment"])
ORDER_IDS = st.integers(min_value=1, max_value=6)
MAX_LINE = 64  # passed as --max-line-bytes: a valid event is 48 to 50 bytes

valid_events = st.builds(
    lambda user, kind, oid: _dump({"user_id": user, "type": kind, "order_id": oid}),
    USERS, TYPES, ORDER_IDS,
)  # fmt: skip


def padded(fields: dict[str, object], length: int) -> bytes:
    """A valid event of exactly ``length`` bytes (an extra field pads it)."""
    head = _dump({**fields, "pad": ""})
    return _dump({**fields, "pad": "x" * (length - len(head))})


@st.composite
def padded_events(draw: st.DrawFn) -> bytes:
    """A valid event padded to around --max-line-bytes, or well over it."""
    fields = {"user_id": draw(USERS), "type": draw(TYPES), "order_id": draw(ORDER_IDS)}
    return padded(fields, draw(st.sampled_from([MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, 300])))


A_ORDER = {"user_id": "a", "type": "order", "order_id": 1}
SHORT_EVENT = _dump({"user_id": "b", "type": "order", "order_id": 2})

# Bad lines, some of whose prefixes are also bad for another reason (or blank).
bad_lines = st.sampled_from(
    [
        b"FAIL HERE",
        b'{"user_id": "a", "type": "order"}',
        b'{"user_id": "b", "type": "refund", "order_id": 3}',
        b"[1, 2]",
        b"-2.5",
        b"12345",
        b'{"user_id": "\xff", "type": "order", "order_id": 1}',
        b"   nul",
    ]
)

blank_lines = st.sampled_from([b"", b" ", b"\t"])

lines_strategy = st.lists(
    st.tuples(
        st.one_of(
            valid_events, valid_events, valid_events, bad_lines, blank_lines, padded_events()
        ),
        st.sampled_from([b"\n", b"\r\n"]),
    ),
    max_size=16,
)


@st.composite
def growing_files(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """The final file, and the sorted cut points at which it is seen while it grows."""
    lines = draw(lines_strategy)
    data = b"".join(text + end for text, end in lines)
    if lines and draw(st.booleans()):  # the final file's last line has no newline either
        data = data[: -len(lines[-1][1])]
    newlines = [i for i, byte in enumerate(data) if byte in b"\r\n"]
    # before a \r, before a \n (between \r and \n for CRLF), after a newline (a line's start)
    marks = sorted({0, len(data), *newlines, *(i + 1 for i in newlines)})
    # (each interesting place twice as likely as a byte anywhere)
    places = st.sampled_from(marks)
    cut = st.one_of(places, places, st.integers(min_value=0, max_value=len(data)))
    return data, sorted(draw(st.lists(cut, min_size=1, max_size=3)))


# committed epoch, the input offset after it, (epoch, offset) of a last line without newline
Record = tuple[int, int, tuple[int, int] | None]


def cut_kind(data: bytes, cut: int) -> str:
    """What a cut point is, for hypothesis's statistics (``--hypothesis-show-statistics``)."""
    before, after = data[cut - 1 : cut], data[cut : cut + 1]
    if cut == len(data):
        return "the whole file"
    if after == b"\r":
        return "before a \\r"
    if after == b"\n":
        return "between \\r and \\n" if before == b"\r" else "before a \\n"
    if cut == 0 or before == b"\n":
        return "at a line's start"
    return "mid-line"


@dataclass
class Outcome:
    """A namespace's runs, what was committed before each resume, and what it holds at the end."""

    runs: list[CommandRun]
    before: list[Record]  # what was committed before each run after the first
    output_file: bytes | None
    states: dict[str, object]
    record: Record
    dead_letters: list[tuple[int, int, str, bytes]]

    @property
    def starts(self) -> list[int]:
        """The resume point each run after the first started at."""
        return [resume_point(record) for record in self.before]


def committed_record(url: str, namespace: str) -> Record:
    client = redis.Redis.from_url(url)
    try:
        info = read_info(client, Keys(namespace))
    finally:
        client.close()
    return info.committed, info.offset, info.open_line


def resume_point(record: Record) -> int:
    """Where a resume starts: the committed last line without a newline, or the next epoch."""
    committed, _, open_line = record
    if open_line is not None and open_line[0] <= committed:
        return open_line[0]
    return committed + 1


def dead_letters(url: str, namespace: str) -> list[tuple[int, int, str, bytes]]:
    """(epoch, line, reason, raw) of each dead letter, oldest first (not the input's path)."""
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrange(Keys(namespace).dead_letters)
    finally:
        client.close()
    return [
        (int(f[b"epoch"]), int(f[b"line"]), f[b"reason"].decode(), f[b"raw"]) for _, f in entries
    ]


def outcome(url: str, namespace: str, runs, before, output: Path | None) -> Outcome:
    return Outcome(
        runs,
        before,
        output.read_bytes() if output is not None else None,
        committed_states(url, namespace),
        committed_record(url, namespace),
        dead_letters(url, namespace),
    )


def options(url: str, namespace: str, on_error: str, partitions: int, batch: int) -> list[str]:
    return [
        "--redis-url", url, "--namespace", namespace, "--on-error", on_error,
        "--partitions", str(partitions), "--batch-events", str(batch), "--workers", "0",
        "--max-line-bytes", str(MAX_LINE),
    ]  # fmt: skip


def clean_run(url: str, path: Path, args: list[str], output: Path | None) -> Outcome:
    sink = [] if output is None else ["--output", str(output)]
    run = run_command(["ingest", str(path), *args, *sink], url)
    return outcome(url, args[3], [run], [], output)


def growing_run(
    url: str, data: bytes, cuts: list[int], path: Path, args: list[str], output: Path | None
) -> Outcome:
    """Ingest the file up to the first cut; then grow it to each next cut (and to its end) and
    resume after each append."""
    sink = [] if output is None else ["--output", str(output)]
    path.write_bytes(data[: cuts[0]])
    runs = [run_command(["ingest", str(path), *args, *sink], url)]
    before = []
    for begin, end in zip(cuts, [*cuts[1:], len(data)], strict=True):
        with open(path, "ab") as f:
            f.write(data[begin:end])
        before.append(committed_record(url, args[3]))
        runs.append(run_command(["resume", str(path), *args, *sink], url))
    return outcome(url, args[3], runs, before, output)


def epoch_of(line: bytes) -> int:
    return int(line.split(b" ", 1)[0])


def printed_once_each(grown: Outcome) -> bytes:
    """Each run's stdout without the lines the next run prints again, then the last run's.

    A resume starts at its resume point, never earlier than the last committed epoch
    (the one line without a newline it reads again); what it prints again from an earlier
    run's output must be the same line. (It may also not print it again: a line that was
    whole JSON without its newline can be bad once complete, here when its ``\\r`` takes it
    over --max-line-bytes. Stdout cannot take back what it printed; the output file can.)
    """
    pieces: list[bytes] = []
    again: dict[int, bytes] = {}
    for run, start in zip(grown.runs, [*grown.starts, None], strict=True):
        for line in run.stdout.splitlines(keepends=True):
            epoch = epoch_of(line)
            if epoch in again:
                assert again.pop(epoch) == line, f"epoch {epoch} printed again differently"
            if start is not None and epoch >= start:
                again[epoch] = line
            else:
                pieces.append(line)
    return b"".join(pieces)


FAILURE = re.compile(r":(\d+) \(epoch (\d+)\): (.*); committed through epoch (-?\d+);")


def failure(run: CommandRun) -> tuple[str, ...] | None:
    """Line number, epoch, reason and committed epoch of the bad line a ``fail`` run stopped at."""
    found = FAILURE.search(run.stderr)
    return found.groups() if found else None


def explain(data: bytes, cuts: list[int], grown: Outcome) -> str:
    runs = "\n".join(f"  exit {r.status}: {r.stdout!r} {r.stderr!r}" for r in grown.runs)
    return f"final file {data!r}\ncuts {cuts}, resume points {grown.starts}\nruns:\n{runs}"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("append-resume")


@pytest.fixture(scope="module")
def namespaces() -> list[str]:
    """Namespaces of this module's own, emptied before each example uses them again."""
    return [new_namespace() for _ in range(4)]


def empty(url: str, names: list[str]) -> None:
    client = redis.Redis.from_url(url)
    try:
        for name in names:
            reset(client, Keys(name))
    finally:
        client.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    file=growing_files(),
    on_error=st.sampled_from(["fail", "skip", "dead-letter"]),
    partitions=st.integers(min_value=1, max_value=3),
    batch=st.sampled_from([2, 20_000]),
)
# Found by this property: a run over a prefix that ends inside a line already over
# --max-line-bytes recorded its resume point mid-line; resume read the line's tail as a line.
@example(
    file=(padded(A_ORDER, 2 * MAX_LINE) + b"\r\n" + SHORT_EVENT + b"\n", [MAX_LINE + 10]),
    on_error="dead-letter", partitions=2, batch=2,
)  # fmt: skip
# A whole event without its newline, which its \r then takes over --max-line-bytes: printed on
# stdout by the first run, and not again (the output file has it cut back).
@example(
    file=(padded(A_ORDER, MAX_LINE) + b"\r\n", [MAX_LINE]), on_error="skip", partitions=1, batch=2
)
def test_append_then_resume_equals_one_clean_run(
    file, on_error, partitions, batch, redis_url, base_dir, namespaces
):
    data, cuts = file
    for cut in cuts:
        event(f"cut {cut_kind(data, cut)}")
    event(f"{len(cuts)} cut(s)")
    empty(redis_url, namespaces)
    workdir = Path(tempfile.mkdtemp(dir=base_dir))
    (workdir / "final").mkdir()
    (workdir / "grown").mkdir()
    final = workdir / "final" / "events.json"
    final.write_bytes(data)
    args = [options(redis_url, ns, on_error, partitions, batch) for ns in namespaces]
    clean_out = clean_run(redis_url, final, args[0], None)
    clean_file = clean_run(redis_url, final, args[1], workdir / "final" / "out.txt")
    grown = workdir / "grown" / "events.json"
    sequences = [
        growing_run(redis_url, data, cuts, grown, args[2], None),
        growing_run(redis_url, data, cuts, grown, args[3], workdir / "grown" / "out.txt"),
    ]

    # The yardstick: one clean run over the final file, as the model says.
    clean = clean_out.runs[0]
    # (an oversized line is bad: the model knows it as a line that is not JSON)
    lines = [b"FAIL HERE" if len(x) > MAX_LINE else x for x in data.split(b"\n")]
    model = cart_model(lines)
    bad = model.bad[0] if on_error == "fail" and model.bad else None
    if bad is not None:
        model = cart_model(lines[:bad])
        found = failure(clean)
        assert clean.status == 65 and found is not None and found[1] == str(bad), clean
    else:
        assert clean.status == 0, clean
    assert clean.stdout == clean_file.output_file == model.output.encode(), clean
    assert clean_out.states == clean_file.states == model.states
    expected_dead = model.bad if on_error == "dead-letter" else []
    assert [d[0] for d in clean_out.dead_letters] == expected_dead

    for sequence in sequences:
        why = explain(data, cuts, sequence)
        last = sequence.runs[-1]
        if on_error == "fail":
            assert (last.status, failure(last)) == (clean.status, failure(clean)), why
        else:
            assert all(run.status == 0 for run in sequence.runs), why
        for record, start in zip(sequence.before, sequence.starts, strict=True):
            # a resume reads again at most the last committed epoch (a line without newline)
            assert start in (record[0], record[0] + 1), why
        assert sequence.states == clean_out.states, why
        assert sequence.record == clean_out.record, why
        assert sequence.dead_letters == clean_out.dead_letters, why
    by_stdout, by_file = sequences
    assert printed_once_each(by_stdout) == clean.stdout, explain(data, cuts, by_stdout)
    assert by_file.output_file == clean_file.output_file, explain(data, cuts, by_file)
