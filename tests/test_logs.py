"""Logs: a UTC time and a level on every line, JSON lines with --log-format json, and -v
for this project's debug lines only (issue 16, Done-when 4); no progress line off a terminal."""

import io
import json
import logging
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from orchestrator import logs
from orchestrator.cli import build_parser

from conftest import SEED_FIRST_RUN, SEED_INPUT, cli_env, run_cli
from reference import reference_run

# 2026-12-07T16:48:17.123Z WARNING resume[4242] orchestrator.sink: ...
TEXT_LINE = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"([a-z-]+)\[(\d+)\] ([\w.]+): (.*)"
)
SINK_WARNING = "out2.txt is not the output file recorded for this namespace: appending to it"


def parse_time(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def seed_dir(tmp_path):
    shutil.copy(SEED_INPUT, tmp_path / "cart-join.json")
    (tmp_path / "out2.txt").write_text("")  # not the recorded --output file: a warning
    return tmp_path


@pytest.mark.integration
def test_log_lines_at_default_verbosity_carry_a_utc_time_and_the_level(tmp_path):
    cwd = seed_dir(tmp_path)
    before = datetime.now(UTC).replace(microsecond=0)
    failed = run_cli("ingest", "cart-join.json", "--output", "out.txt", cwd=cwd)
    assert failed.returncode == 65, failed.stderr
    run = run_cli("resume", "cart-join.json", "--output", "out2.txt", "--on-error", "skip", cwd=cwd)
    assert run.returncode == 0, run.stderr
    after = datetime.now(UTC)
    [warning] = [m for x in run.stderr.splitlines() if (m := TEXT_LINE.fullmatch(x))]
    at, level, command, _, logger, message = warning.groups()
    assert before <= parse_time(at) <= after
    assert (level, command, logger) == ("WARNING", "resume", "orchestrator.sink")
    assert message.startswith(SINK_WARNING)
    # The messages for users stay as the docs quote them; at default verbosity nothing else.
    assert [x for x in run.stderr.splitlines() if not TEXT_LINE.fullmatch(x)] == [
        "orchestrator: skipped 1 bad line: cart-join.json:6 (epoch 5): invalid JSON: "
        "unexpected 'F' at column 1",
        "orchestrator: done: 2 events, committed through epoch 7",
    ]


@pytest.mark.integration
def test_json_log_lines_parse_and_verbosity_raises_this_projects_loggers_first(tmp_path):
    cwd = seed_dir(tmp_path)
    env = cli_env(ORCHESTRATOR_LOG_FORMAT="json")
    failed = run_cli("ingest", "cart-join.json", "--output", "out.txt", "-v", cwd=cwd, env=env)
    assert failed.returncode == 65, failed.stderr
    assert (cwd / "out.txt").read_text() == SEED_FIRST_RUN
    run = run_cli("resume", "cart-join.json", "--output", "out2.txt", "--on-error", "skip",
                  "-vv", cwd=cwd, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    verbose, very = (json_lines(r.stderr) for r in (failed, run))
    for record in verbose + very:
        assert {"time", "level", "logger", "message", "command", "pid"} <= set(record), record
        parse_time(record["time"])
    # -v: debug lines of the driver and of its workers, and none of RQ or redis-py
    debug = {(x["command"], x["logger"]) for x in verbose if x["level"] == "DEBUG"}
    assert ("worker", "tasks.store") in debug, verbose
    assert not [x for x in verbose if x["logger"].startswith(("rq", "redis"))], verbose
    # The message for users is a JSON line too.
    [error] = [x for x in verbose if x["level"] == "ERROR"]
    assert error["logger"] == "orchestrator" and error["command"] == "ingest"
    assert error["message"].startswith("cart-join.json:6 (epoch 5): invalid JSON")
    # -vv: RQ's debug lines too
    assert any(x["logger"].startswith("rq.") and x["level"] == "DEBUG" for x in very), very
    [warning] = [x for x in very if x["level"] == "WARNING"]
    assert warning["logger"] == "orchestrator.sink" and warning["command"] == "resume"
    assert warning["message"].startswith(SINK_WARNING)
    assert very[-1]["message"] == "done: 2 events, committed through epoch 7"


def json_lines(stderr):
    records = []
    for line in stderr.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r} in:\n{stderr}")
    return records


def test_verbosity_counts_flags_or_comes_from_the_environment(monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["status"]).verbose == 0
    assert parser.parse_args(["status", "-vv"]).verbose == 2
    for value, count in [("2", 2), ("1", 1), ("true", 1), ("no", 0), ("", 0)]:
        monkeypatch.setenv("ORCHESTRATOR_VERBOSE", value)
        assert build_parser().parse_args(["status"]).verbose == count, value
    # flags replace the environment's count (a worker gets both from its driver)
    monkeypatch.setenv("ORCHESTRATOR_VERBOSE", "2")
    assert build_parser().parse_args(["status", "-v"]).verbose == 1
    assert build_parser().parse_args(["status", "--verbose", "-v"]).verbose == 2


def test_a_bad_log_format_is_a_usage_error(tmp_path):
    run = run_cli("status", "--log-format", "xml", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("orchestrator: argument --log-format: invalid choice: 'xml'")


@pytest.fixture
def restore_logging():
    yield
    logs.configure_logging(0)


def test_an_exception_in_a_text_log_line_is_one_line_without_v(restore_logging, capsys):
    logs.configure_logging(0, command="worker")
    try:
        raise ValueError("lost the job\nsecond line")
    except ValueError:
        logging.getLogger("rq.worker").exception("job failed")
    line = capsys.readouterr().err
    pid = os.getpid()
    assert line.endswith(f" ERROR worker[{pid}] rq.worker: job failed (ValueError: lost the job)\n")


def test_a_json_log_line_carries_the_records_extra_fields(restore_logging, capsys):
    logs.configure_logging(1, log_format="json", command="ingest")
    logging.getLogger("orchestrator.dispatch").debug("sent", extra={"partition": 3})
    logging.getLogger("orchestrator.x").info("ignored %s", "?", extra={"at": time})
    first, second = (json.loads(x) for x in capsys.readouterr().err.splitlines())
    assert first["partition"] == 3 and first["level"] == "DEBUG"
    assert first["logger"] == "orchestrator.dispatch" and first["message"] == "sent"
    assert second["message"] == "ignored ?" and second["at"].startswith("<module 'time'")


def test_a_workers_flags_carry_the_verbosity_and_format():
    assert logs.worker_flags(0, "text") == []
    assert logs.worker_flags(2, "json") == ["--verbose", "--verbose", "--log-format", "json"]


@pytest.mark.integration
def test_no_progress_line_when_stderr_is_not_a_terminal_or_with_q(tmp_path):
    shutil.copy(SEED_INPUT, tmp_path / "in.json")
    expected, _ = reference_run(SEED_INPUT.read_text().splitlines(), skip_bad=True)
    # stdout on a terminal, stderr not: the progress line would go to stderr
    master, slave = pty.openpty()
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator", "ingest", "in.json", "--on-error", "skip"],
        cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, stdout=slave,
        stderr=subprocess.PIPE, timeout=120,
    )  # fmt: skip
    os.close(slave)
    shown = _drain(master)
    assert run.returncode == 0, run.stderr
    assert b"\r" not in run.stderr + shown.replace(b"\r\n", b"\n"), (run.stderr, shown)
    # -q with both on the terminal: the output lines only
    master, slave = pty.openpty()
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator", "replay", "in.json", "--from-epoch", "0",
         "--on-error", "skip", "-q"],
        cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        timeout=120,
    )  # fmt: skip
    os.close(slave)
    assert run.returncode == 0
    assert _drain(master).decode().replace("\r\n", "\n") == expected


def _drain(fd):
    out = io.BytesIO()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        out.write(chunk)
    os.close(fd)
    return out.getvalue()


class StopRequested(Exception):
    """What RQ's worker raises from its SIGTERM handler, wherever the worker is."""


class Interrupted(io.StringIO):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def write(self, text):
        raise self.error


def test_an_exception_from_a_signal_handler_during_a_log_write_reaches_the_code_it_stops(
    restore_logging, capsys
):
    logs.configure_logging(2, command="worker")
    [handler] = logging.getLogger().handlers
    handler.setStream(Interrupted(StopRequested()))
    with pytest.raises(StopRequested):  # (logging's own emit would print it and go on)
        logging.getLogger("tasks.jobs").warning("committing")
    handler.setStream(Interrupted(OSError("disk full")))
    logging.getLogger("tasks.jobs").warning("committing")  # reported by logging, no raise
    assert "OSError: disk full" in capsys.readouterr().err
