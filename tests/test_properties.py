"""Property-based tests of bad-input handling, through the real CLI against a real Redis.

Hypothesis generates input files mixing valid cart events (payments before
orders and duplicates included), malformed lines of every documented kind,
lines over ``--max-line-bytes`` and blank lines; ``tests/model.py`` says what
each run must print and leave in Redis. Every example runs CLI subprocesses,
so each property tries only a few examples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.keys import Keys

from conftest import cli_env, new_namespace, run_cli, stderr_lines
from model import cart_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 3
MAX_LINE = 200  # passed as --max-line-bytes
OVERSIZED_STAND_IN = b"FAIL HERE"  # what an oversized line is, for the model: a bad line

USERS = st.sampled_from(["a", "b", "c", "d", "e"])
TYPES = st.sampled_from(["order", "payment"])
ORDER_IDS = st.integers(min_value=1, max_value=20)


def _dump(value: object) -> bytes:
    return json.dumps(value).encode()


valid_events = st.builds(
    lambda user, kind, oid: _dump({"user_id": user, "type": kind, "order_id": oid}),
    USERS, TYPES, ORDER_IDS,
)  # fmt: skip

not_json = st.sampled_from(
    [
        b"FAIL HERE",
        b'{"user_id": ',
        b'{"user_id": "a", "type": "order", "order_id": 1',
        b"{user_id: 'a'}",
        b'{"user_id": "a", "type": "order", "order_id": 1}}',
        b"nul",
    ]
)

not_object = st.sampled_from([b"[1, 2]", b'"x"', b"3", b"null", b"true", b"[]", b"-2.5"])


@st.composite
def missing_field(draw: st.DrawFn) -> bytes:
    event = {"user_id": draw(USERS), "type": draw(TYPES), "order_id": draw(ORDER_IDS)}
    for name in draw(st.lists(st.sampled_from(sorted(event)), min_size=1, max_size=3, unique=True)):
        del event[name]
    return _dump(event)


@st.composite
def wrong_type(draw: st.DrawFn) -> bytes:
    event = {"user_id": draw(USERS), "type": draw(TYPES), "order_id": draw(ORDER_IDS)}
    name = draw(st.sampled_from(["user_id", "type", "order_id"]))
    if name == "order_id":
        event[name] = draw(st.sampled_from(["1", "7", 1.0, 2.5, True, False, None, [1], {"id": 1}]))
    elif name == "user_id":
        event[name] = draw(st.sampled_from([1, 0, -3, 2.0, None, True, ["a"], {"u": "a"}]))
    else:
        event[name] = draw(st.sampled_from([1, 0, None, False, ["order"]]))
    return _dump(event)


unknown_type = st.builds(
    lambda user, kind, oid: _dump({"user_id": user, "type": kind, "order_id": oid}),
    USERS, st.sampled_from(["refund", "Order", "PAYMENT", "", "order "]), ORDER_IDS,
)  # fmt: skip

invalid_utf8 = st.sampled_from(
    [
        b'{"user_id": "\xff", "type": "order", "order_id": 1}',
        b'{"user_id": "a\xc3", "type": "payment", "order_id": 2}',
        b'{"user_id": "b", "type": "order", "order_id": 3, "note": "\xed\xa0\x80"}',
        b"\xfe\xff",
    ]
)


@st.composite
def padded_event(draw: st.DrawFn, length: int) -> bytes:
    """A valid event of exactly ``length`` bytes (an extra field pads it)."""
    event = {"user_id": draw(USERS), "type": draw(TYPES), "order_id": draw(ORDER_IDS)}
    head = _dump({**event, "pad": ""})
    line = _dump({**event, "pad": "x" * (length - len(head))})
    assert len(line) == length
    return line


# Lines around the limit: 200 bytes is fine, 201 is over it.
sized = st.sampled_from([150, MAX_LINE, MAX_LINE + 1, MAX_LINE + 2, 600]).flatmap(
    lambda n: padded_event(n)
)

blank = st.sampled_from([b"", b" ", b"   ", b"\t"])

malformed = st.one_of(
    not_json, not_object, missing_field(), wrong_type(), unknown_type, invalid_utf8
)

lines_strategy = st.lists(
    st.one_of(valid_events, valid_events, valid_events, valid_events, malformed, sized, blank),
    max_size=30,
)

PROPERTY_SETTINGS = settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def model_of(lines: list[bytes]):
    """``cart_model`` with oversized lines (by --max-line-bytes) replaced by a known bad line."""
    return cart_model([OVERSIZED_STAND_IN if len(x) > MAX_LINE else x for x in lines])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


def write_input(base: Path, lines: list[bytes]) -> Path:
    """A fresh directory (hypothesis re-uses function-scoped fixtures) with the input file."""
    workdir = Path(tempfile.mkdtemp(dir=base))
    (workdir / "events.json").write_bytes(b"".join(x + b"\n" for x in lines))
    return workdir


def ingest(workdir: Path, redis_url: str, ns: str, *options: str):
    return run_cli(
        "ingest", "events.json", "--redis-url", redis_url, "--namespace", ns,
        "--partitions", str(PARTITIONS), "--workers", "1", "--max-line-bytes", str(MAX_LINE),
        *options, cwd=workdir, env=cli_env(),
    )  # fmt: skip


def committed_states(redis_url: str, ns: str) -> dict[str, dict]:
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        states: dict[str, dict] = {}
        for p in range(PARTITIONS):
            for user, raw in client.hgetall(Keys(ns).state(p)).items():
                assert user.decode() not in states, f"user {user!r} in two partitions"
                states[user.decode()] = orjson.loads(raw)
        return states
    finally:
        client.close()


def explain(run) -> str:
    return f"exit {run.returncode}\n--- stdout\n{run.stdout}--- stderr\n{run.stderr}"


@settings(PROPERTY_SETTINGS, max_examples=10)
@given(lines=lines_strategy)
def test_skip_leaves_out_exactly_the_bad_lines(lines, redis_url, base_dir):
    workdir = write_input(base_dir, lines)
    ns = new_namespace()
    expected = model_of(lines)
    run = ingest(workdir, redis_url, ns, "--on-error", "skip")
    assert run.returncode == 0, explain(run)
    assert "Traceback" not in run.stderr, explain(run)
    assert run.stdout == expected.output, explain(run)
    if expected.bad:
        n = len(expected.bad)
        assert f"skipped {n} bad line{'s' if n > 1 else ''}" in run.stderr, explain(run)
    assert committed_states(redis_url, ns) == expected.states


@settings(PROPERTY_SETTINGS, max_examples=8)
@given(lines=lines_strategy)
def test_dead_letter_records_exactly_the_bad_lines(lines, redis_url, base_dir):
    workdir = write_input(base_dir, lines)
    ns = new_namespace()
    expected = model_of(lines)
    run = ingest(workdir, redis_url, ns, "--on-error", "dead-letter")
    assert run.returncode == 0, explain(run)
    assert "Traceback" not in run.stderr, explain(run)
    assert run.stdout == expected.output, explain(run)
    assert committed_states(redis_url, ns) == expected.states

    listing = run_cli(
        "dead-letters", "--json", "--redis-url", redis_url, "--namespace", ns,
        cwd=workdir, env=cli_env(),
    )  # fmt: skip
    assert listing.returncode == 0, explain(listing)
    assert "Traceback" not in listing.stderr, explain(listing)
    letters = [json.loads(x) for x in listing.stdout.splitlines()]
    assert [d["line"] for d in letters] == [e + 1 for e in expected.bad], explain(listing)
    assert [d["epoch"] for d in letters] == expected.bad, explain(listing)
    for letter in letters:
        assert letter["reason"], letter
        raw = lines[letter["epoch"]]
        if len(raw) <= MAX_LINE:  # an oversized line keeps only its start
            assert letter["raw"] == raw.decode("utf-8", "backslashreplace"), letter


@settings(PROPERTY_SETTINGS, max_examples=12)
@given(lines=lines_strategy)
def test_fail_stops_at_the_first_bad_line(lines, redis_url, base_dir):
    workdir = write_input(base_dir, lines)
    ns = new_namespace()
    expected = model_of(lines)
    run = ingest(workdir, redis_url, ns)  # --on-error fail is the default
    assert "Traceback" not in run.stderr, explain(run)
    if not expected.bad:
        assert run.returncode == 0, explain(run)
        assert run.stdout == expected.output, explain(run)
        assert committed_states(redis_url, ns) == expected.states
        return
    first = expected.bad[0]
    assert run.returncode == 65, explain(run)
    messages = stderr_lines(run)
    assert len(messages) == 1, explain(run)
    assert f"events.json:{first + 1} (epoch {first})" in messages[0], explain(run)
    before = model_of(lines[:first])
    assert run.stdout == before.output, explain(run)
    assert committed_states(redis_url, ns) == before.states
