"""Every refusal is one clear line on stderr with an exit status a script can act on; and the
command's manners: --version, -u, a description in every --help, -q, a pasteable worker
command in status, escaped control characters in dead-letters, the progress line kept
out of the output on a terminal, "1 batch" rather than "1 batches"."""

import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import termios
import threading
import time
import tomllib

import pytest

from bench.generate import generate
from tasks.errors import ExitStatus
from tasks.keys import Keys

from conftest import (
    REPO,
    SEED_FIRST_RUN,
    SEED_INPUT,
    cli_env,
    new_namespace,
    run_cli,
    stderr_lines,
)
from reference import reference_run

pytestmark = pytest.mark.integration


def one_line_error(run, status):
    assert run.returncode == status, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = stderr_lines(run)
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_a_missing_input_file(tmp_path):
    message = one_line_error(run_cli("ingest", "nope.json", cwd=tmp_path), ExitStatus.NO_INPUT)
    assert "cannot read nope.json" in message


def test_an_unreachable_redis_never_prints_the_password(tmp_path):
    run = run_cli("status", "--redis-url", "redis://:hunter2@127.0.0.1:1/0", cwd=tmp_path)
    message = one_line_error(run, ExitStatus.REDIS_UNAVAILABLE)
    assert "cannot reach Redis at redis://***@127.0.0.1:1/0" in message
    assert "hunter2" not in run.stderr + run.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["ingest", "x.json", "--partitions", "0"],
        ["ingest", "x.json", "--workers", "-1"],
        ["ingest", "x.json", "--on-error", "ignore"],
        ["replay", "x.json"],
        ["status", "--namespace", "a:b"],
        ["frobnicate"],
    ],
)
def test_bad_options_are_one_line_usage_errors_that_point_at_help(tmp_path, args):
    message = one_line_error(run_cli(*args, cwd=tmp_path), ExitStatus.USAGE)
    assert message.startswith("orchestrator: ") and "--help')" in message


def test_reset_wants_yes(tmp_path):
    message = one_line_error(run_cli("reset", cwd=tmp_path), ExitStatus.USAGE)
    assert "--yes" in message


@pytest.fixture
def ingested(redis_url, tmp_path):
    ns = new_namespace()
    shutil.copy(SEED_INPUT, tmp_path / "cart-join.json")
    args = ["--redis-url", redis_url, "--namespace", ns]
    run = run_cli(
        "ingest", "cart-join.json", "--partitions", "3", "--workers", "1", *args, cwd=tmp_path
    )
    assert run.returncode == ExitStatus.DATA_ERROR
    return tmp_path, args


def test_another_partition_count_rescales_the_namespace_first_and_says_so(ingested):
    cwd, args = ingested
    run = run_cli("resume", "cart-join.json", "--partitions", "4", "--workers", "1", *args, cwd=cwd)
    assert run.returncode == ExitStatus.DATA_ERROR, run.stderr  # the seed's bad line, after it
    assert "Traceback" not in run.stderr
    lines = stderr_lines(run)
    assert len(lines) == 3, run.stderr
    assert lines[0].startswith("orchestrator: rescaling namespace ")
    assert "from 3 partitions to 4 as of epoch 4" in lines[0]
    assert lines[1].startswith("orchestrator: rescaled namespace ")
    assert "cart-join.json:6 (epoch 5)" in lines[2]
    status = json.loads(run_cli("status", "--json", *args, cwd=cwd).stdout)
    assert status["partitions"] == 4


def test_a_truncated_input_is_refused_on_resume(ingested):
    cwd, args = ingested
    (cwd / "cart-join.json").write_text('{"user_id": "a", "type": "order", "order_id": 1}\n')
    run = run_cli("resume", "cart-join.json", "--workers", "1", *args, cwd=cwd)
    message = one_line_error(run, ExitStatus.NO_INPUT)
    assert "shorter" in message and "epoch 5" in message


def test_status_json_and_reset(ingested, real):
    cwd, args = ingested
    ns = args[args.index("--namespace") + 1]

    status = run_cli("status", "--json", *args, cwd=cwd)
    report = json.loads(status.stdout)
    assert report["committed_epoch"] == 4
    assert report["partitions"] == 3
    assert [p["partition"] for p in report["partition_progress"]] == [0, 1, 2]
    assert report["driver"] is None
    reset = run_cli("reset", "--yes", *args, cwd=cwd)
    assert reset.returncode == 0
    after = json.loads(run_cli("status", "--json", *args, cwd=cwd).stdout)
    assert after["partitions"] is None and after["committed_epoch"] is None
    # Nothing of the namespace is left, in its keys or in RQ's registry of queues.
    assert not list(real.scan_iter(match=f"{ns}:*"))
    assert not [q for q in real.smembers("rq:queues") if f"{ns}-p".encode() in q]


def test_a_second_driver_on_the_namespace_is_refused(redis_url, real, tmp_path):
    ns = new_namespace()
    # A driver that waits for workers that never come holds the namespace.
    (tmp_path / "in.json").write_text('{"user_id": "a", "type": "order", "order_id": 1}\n')
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", "in.json", *args],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not real.get(Keys(ns).driver_lock):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = run_cli("resume", "in.json", *args, cwd=tmp_path, timeout=30)
        message = one_line_error(second, ExitStatus.LOCKED)
        assert "another driver is running" in message
    finally:
        first.terminate()
        _, stderr = first.communicate(timeout=30)
    # SIGTERM stops a driver cleanly: it releases the namespace at once.
    assert first.returncode == ExitStatus.INTERRUPTED, stderr
    assert real.get(Keys(ns).driver_lock) is None


def test_the_flow_is_fixed_at_the_first_ingest(ingested):
    cwd, args = ingested
    run = run_cli(
        "resume", str(cwd / "cart-join.json"), "--flow", "examples.running_sum:flow",
        "--workers", "1", *args, cwd=REPO,
    )  # fmt: skip
    message = one_line_error(run, ExitStatus.USAGE)
    assert "does not match the namespace's flow tasks.cartjoin:flow" in message


def test_every_option_names_its_environment_variable():
    from argparse import SUPPRESS

    from orchestrator.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    for name, command in sub.choices.items():
        for action in command._actions:
            # (internal flags, hidden from --help, are not user options)
            if action.option_strings and action.dest != "help" and action.help != SUPPRESS:
                assert "(env " in (action.help or ""), (name, action.option_strings)


def test_options_come_from_the_environment(redis_url, tmp_path):
    ns = new_namespace()
    (tmp_path / "in.json").write_text(SEED_INPUT.read_text())
    env = cli_env(
        RQ_REDIS_URL=redis_url, ORCHESTRATOR_NAMESPACE=ns, ORCHESTRATOR_ON_ERROR="skip",
        ORCHESTRATOR_WORKERS="1", ORCHESTRATOR_PARTITIONS="2",
    )  # fmt: skip
    run = run_cli("ingest", "in.json", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(
        run_cli("status", cwd=tmp_path, env={**env, "ORCHESTRATOR_JSON": "1"}).stdout
    )
    assert (report["namespace"], report["partitions"], report["committed_epoch"]) == (ns, 2, 7)
    bad = run_cli("status", cwd=tmp_path, env={**env, "ORCHESTRATOR_NAMESPACE": "a:b"})
    assert bad.returncode == 2 and "invalid namespace" in bad.stderr


@pytest.mark.parametrize(
    "command", [["status"], ["ingest", "in.json", "--workers", "1", "--on-error", "skip"]]
)
def test_a_reader_that_goes_away_ends_the_command_quietly(command, redis_url, tmp_path):
    (tmp_path / "in.json").write_text(SEED_INPUT.read_text())
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has exited: every write fails
    args = [*command, "--redis-url", redis_url, "--namespace", new_namespace()]
    try:
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=cli_env(),
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert run.returncode == ExitStatus.OUTPUT_CLOSED, run.stderr
    assert "Traceback" not in run.stderr


def test_version_prints_the_package_version(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    run = run_cli("--version", cwd=tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (0, f"orchestrator {version}\n", "")


def test_u_is_short_for_redis_url_on_every_command_that_has_it():
    from orchestrator.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    for name, command in sub.choices.items():
        [url] = [a for a in command._actions if a.dest == "redis_url"]
        assert url.option_strings == ["-u", "--redis-url"], name


def test_u_reaches_the_redis_it_names(ingested):
    cwd, args = ingested
    args = ["-u" if a == "--redis-url" else a for a in args]
    report = json.loads(run_cli("status", "--json", *args, cwd=cwd).stdout)
    assert report["committed_epoch"] == 4


def test_every_command_help_says_what_the_command_does(tmp_path):
    commands = ["ingest", "resume", "replay", "status", "state", "worker", "dead-letters", "reset"]
    for command in commands:
        run = run_cli(command, "--help", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        # usage block, a blank line, the description, a blank line, the options
        description = run.stdout.split("\n\n")[1]
        assert len(description.split()) >= 5 and not description.startswith(
            ("options:", "positional arguments:")
        ), (command, run.stdout)


@pytest.mark.parametrize(
    "url",
    ["redis://:hunter2@h:6379/0", 'unix:///tmp/a dir/$x`y`\\z"q/redis.sock', "redis://h:1/2"],
)
def test_the_rq_worker_command_of_status_pastes_into_a_shell(url):
    from orchestrator.queries import rq_worker_command

    command = rq_worker_command(url, Keys("ns"), 2)
    assert command.startswith('rq worker --url "')
    # What a shell makes of it, with REDIS_URL set as the user of a password URL has it.
    run = subprocess.run(
        ["sh", "-c", f"set -- {command}; printf '%s\\n' \"$@\""],
        env={"REDIS_URL": url, "PATH": os.environ["PATH"]}, capture_output=True, text=True,
    )  # fmt: skip
    assert run.stdout.splitlines() == [
        "rq", "worker", "--url", url, "--serializer", "json",
        "--dequeue-strategy", "round_robin", "{ns-p0}", "{ns-p1}",
    ]  # fmt: skip
    assert "hunter2" not in command


@pytest.fixture
def embedded_run(tmp_path):
    """The seed's run on the embedded server, in a namespace of its own."""
    shutil.copy(SEED_INPUT, tmp_path / "cart-join.json")
    run = run_cli("ingest", "cart-join.json", "--namespace", "seed", cwd=tmp_path)
    assert run.returncode == ExitStatus.DATA_ERROR, run.stderr
    return tmp_path


def test_status_of_the_embedded_server_says_how_to_add_workers(embedded_run):
    run = run_cli("status", "--namespace", "seed", cwd=embedded_run)
    assert run.returncode == 0, run.stderr
    # Not the unix socket of a server that stops with the status command.
    assert "unix://" not in run.stdout and "rq worker" not in run.stdout
    assert "more workers:    orchestrator worker --namespace seed (" in run.stdout
    report = json.loads(run_cli("status", "--namespace", "seed", "--json", cwd=embedded_run).stdout)
    assert report["rq_worker_command"] is None
    assert report["worker_command"] == "orchestrator worker --namespace seed"


def test_quiet_prints_only_errors(embedded_run):
    skip = run_cli("resume", "cart-join.json", "--namespace", "seed", "--on-error", "skip", "-q",
                   cwd=embedded_run)  # fmt: skip
    assert (skip.returncode, skip.stderr) == (0, "")  # no skip summary, no "done"
    assert skip.stdout.splitlines()[-2:] == [
        '6 {"user_id": "a", "paid_order_ids": [2, 1], "unpaid_order_ids": []}',
        '7 {"user_id": "b", "paid_order_ids": [4], "unpaid_order_ids": [3]}',
    ]
    (embedded_run / "again.json").write_text(SEED_INPUT.read_text())
    fail = run_cli("ingest", "again.json", "--namespace", "other", "-q", cwd=embedded_run)
    assert fail.stdout == SEED_FIRST_RUN
    assert "invalid JSON" in one_line_error(fail, ExitStatus.DATA_ERROR)


def test_counts_of_one_are_singular(embedded_run):
    (embedded_run / "one.json").write_text('{"user_id": "z", "type": "order", "order_id": 9}\n')
    run = run_cli("ingest", "one.json", "--namespace", "one", cwd=embedded_run)
    assert run.returncode == 0, run.stderr
    assert stderr_lines(run) == ["orchestrator: done: 1 event, committed through epoch 0"]
    cleared = run_cli("dead-letters", "clear", "--namespace", "one", cwd=embedded_run)
    assert cleared.stderr == "orchestrator: cleared 0 dead letters\n"


ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m"  # set the title, clear the screen, turn red


def test_dead_letters_escape_terminal_control_characters_and_json_keeps_them(redis_url, tmp_path):
    ns = new_namespace()
    bad = f'{{"user_id": "{ESCAPES}", "type": 1}}'
    (tmp_path / "in.json").write_text(f"{ESCAPES}\n{bad}\n")
    args = ["--redis-url", redis_url, "--namespace", ns]
    run = run_cli("ingest", "in.json", "--on-error", "dead-letter", "--workers", "1", *args,
                  cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    text = run_cli("dead-letters", *args, cwd=tmp_path).stdout
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), repr(text)
    assert "    \\x1b]0;owned\\x07\\x1b[2J\\x1b[31m\n" in text
    letters = [json.loads(x) for x in run_cli("dead-letters", "--json", *args, cwd=tmp_path)
               .stdout.splitlines()]  # fmt: skip
    assert [letter["raw"] for letter in letters] == [ESCAPES, bad]


def test_the_progress_line_names_one_batch_in_the_singular():
    from orchestrator.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress(enabled=True, stream=terminal)
    progress.start(0, None)
    progress.update(read=2, committed=1, committed_epoch=0, committed_offset=10, in_flight=1)
    assert "lag 1 event," in terminal.getvalue()
    assert "1 batch in flight" in terminal.getvalue()


def test_a_message_on_stderr_erases_the_progress_line_first(capsys):
    from orchestrator.messages import say
    from orchestrator.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress(enabled=True, stream=terminal)
    progress.update(read=5, committed=2, committed_epoch=1, committed_offset=10, in_flight=1)
    say("lost the connection to Redis")
    assert terminal.getvalue().endswith(" in flight\x1b[K\r\x1b[K")
    assert capsys.readouterr().err == "orchestrator: lost the connection to Redis\n"
    say("again")  # nothing more to erase
    assert terminal.getvalue().endswith(" in flight\x1b[K\r\x1b[K")


# (a file: the share of it committed, and the time left)
PROGRESS = re.compile(
    rb"\r(\d+\.\d)% committed \((?:through epoch [\d,]+|no epoch yet)\), [\d,]+ events/s, "
    rb"ETA (\d+:\d\d:\d\d|--:--:--), [\d,]+ batch(?:es)? in flight\x1b\[K"
)


def test_output_lines_on_the_terminal_of_the_progress_line_start_on_a_clean_line(tmp_path):
    lines = list(generate(150_000, 5_000, seed=3))
    (tmp_path / "in.json").write_text("\n".join(lines) + "\n")
    # stdout and stderr on one terminal, as in an interactive shell; the terminal does
    # not turn "\n" into "\r\n", so what the command wrote is what is read here.
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    written = bytearray()
    reader = threading.Thread(target=_read_all, args=(master, written))
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "ingest", "in.json", "--batch-events", "2000"],
            cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
            timeout=120,
        )  # fmt: skip
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    assert proc.returncode == 0, bytes(written[-2000:])
    shown = list(PROGRESS.finditer(written))
    assert shown, "no progress line was shown: the run was too short to test anything"
    shares = [float(match[1]) for match in shown]
    assert shares == sorted(shares) and shares[-1] <= 100.0, shares
    assert written.count(b"\r") - written.count(b"\r\x1b[K") == len(shown), (
        "a progress line without a percentage or ETA"
    )
    etas = [match[2] for match in shown if match[2] != b"--:--:--"]
    assert etas, "no ETA shown: nothing was committed while the line was up"
    for match in shown:
        # after a progress line, the next thing is another one or its erasure
        assert written[match.end() : match.end() + 1] in (b"\r", b""), bytes(
            written[match.start() : match.end() + 80]
        )
    text = PROGRESS.sub(b"", bytes(written)).replace(b"\r\x1b[K", b"").decode()
    expected, _ = reference_run(lines)
    assert text == expected + "orchestrator: done: 150,000 events, committed through epoch 149999\n"


def _read_all(fd, into):
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            return
        if not chunk:
            return
        into += chunk


def test_a_bad_line_names_the_resume_command_with_its_output_file(tmp_path):
    (tmp_path / "in.json").write_text(SEED_INPUT.read_text())
    run = run_cli("ingest", "in.json", "--output", "out.txt", cwd=tmp_path)
    assert run.returncode == 65, run.stderr
    assert "run 'orchestrator resume in.json --output out.txt' (or add" in run.stderr
