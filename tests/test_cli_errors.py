"""Every refusal is one clear line on stderr with an exit status a script can act on."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from orchestrator.exitcodes import ExitStatus
from tasks.keys import Keys

from conftest import REPO, SEED_INPUT, cli_env, new_namespace, run_cli, stderr_lines

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
def test_bad_options_are_usage_errors(tmp_path, args):
    run = run_cli(*args, cwd=tmp_path)
    assert run.returncode == ExitStatus.USAGE
    assert "usage: orchestrator" in run.stderr


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


def test_the_partition_count_is_fixed_at_the_first_ingest(ingested):
    cwd, args = ingested
    run = run_cli("resume", "cart-join.json", "--partitions", "4", "--workers", "1", *args, cwd=cwd)
    message = one_line_error(run, ExitStatus.USAGE)
    assert "--partitions 4 does not match the namespace's 3" in message


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
    assert not [q for q in real.smembers("rq:queues") if q.startswith(f"rq:queue:{ns}-".encode())]


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
