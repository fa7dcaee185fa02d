"""Flows that hang on one event or kill their worker, run by the CLI on a real redis-server.

Every run ends, in bounded time: under ``fail`` with exit 65 and one line naming
the epoch, the key and the cause; under ``dead-letter`` with the exact output of
the input without that line, the line a dead letter with its cause. No worker
process is left behind.
"""

import json
import re
import time

import psutil
import pytest

from bench.generate import generate

from conftest import REPO, cli_env, new_namespace, run_cli, stderr_lines
from helpers import committed_states
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT = 3
CURSED = 10**9  # the order id the test flows misbehave on (tests/flows/)


def cursed_input(tmp_path, events, at, order_id=CURSED):
    lines = list(generate(events, 200, seed=12))
    lines.insert(at, json.dumps({"user_id": "u7", "type": "order", "order_id": order_id}))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def ingest(path, redis_url, ns, flow, on_error, batch_events):
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2", "--partitions", "2",
            "--batch-events", str(batch_events), "--batch-timeout", str(TIMEOUT),
            "--flow", flow, "--on-error", on_error]  # fmt: skip
    began = time.monotonic()
    # (run from the repository: the flows are modules of its tests)
    run = run_cli("ingest", str(path), *args, cwd=REPO, env=cli_env(), timeout=120)
    return run, time.monotonic() - began


def no_workers_left(ns):
    """No process of the run is left: forked workers keep the driver's argv, spawned ones
    have ``--namespace NS`` in theirs."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if ns in cmdline and "orchestrator" in cmdline:
                left.append(proc)
        if not left or time.monotonic() > deadline:
            return left == []
        time.sleep(0.1)


def expected_without(lines, at):
    """The reference run of the input with the cursed line left out (its epoch kept)."""
    kept = [*lines[:at], "", *lines[at + 1 :]]
    return reference_run(kept)


def dead_letters(redis_url, ns):
    run = run_cli("dead-letters", "--json", "--redis-url", redis_url, "--namespace", ns,
                  cwd=REPO, env=cli_env())  # fmt: skip
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


HANGS = ["tests.flows.hung_cart:flow", "tests.flows.regex_cart:flow"]


@pytest.mark.parametrize("flow", HANGS, ids=["python-loop", "catastrophic-regex"])
def test_a_hang_under_fail_stops_the_run_naming_epoch_key_and_timeout(redis_url, tmp_path, flow):
    path, lines = cursed_input(tmp_path, 3_000, 1_500)
    ns = new_namespace()
    run, took = ingest(path, redis_url, ns, flow, "fail", 200)
    assert run.returncode == 65, run.stderr
    assert took < TIMEOUT + 15
    [message] = stderr_lines(run)
    assert message.startswith(f"orchestrator: {path}:1501 (epoch 1500): timed out: ")
    assert f"did not finish epoch 1500 (key 'u7') within {TIMEOUT} s" in message
    assert "committed through epoch 1499" in message
    assert "fix the input" not in message and "--batch-timeout" in message
    assert "Traceback" not in run.stderr
    assert run.stdout == reference_run(lines[:1_500])[0]
    assert no_workers_left(ns)


@pytest.mark.parametrize("flow", HANGS, ids=["python-loop", "catastrophic-regex"])
def test_a_hang_under_dead_letter_leaves_out_that_event_only(redis_url, tmp_path, flow):
    path, lines = cursed_input(tmp_path, 3_000, 1_500)
    ns = new_namespace()
    run, took = ingest(path, redis_url, ns, flow, "dead-letter", 200)
    assert run.returncode == 0, run.stderr
    assert took < TIMEOUT + 15
    assert "Traceback" not in run.stderr
    # the hang's worker renewed its lease from the timer's ticks: no batch was sent twice
    assert "re-run" not in run.stderr
    [letter] = dead_letters(redis_url, ns)
    assert (letter["epoch"], letter["line"]) == (1_500, 1_501)
    assert letter["reason"].startswith("timed out: the flow did not finish epoch 1500 (key 'u7')")
    output, states = expected_without(lines, 1_500)
    assert run.stdout == output
    assert committed_states(redis_url, ns) == states
    assert no_workers_left(ns)


LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (WARNING|ERROR) [a-z]+\[\d+\] \S+: .*"
)


@pytest.mark.parametrize(
    ("on_error", "order_id"),
    [("fail", CURSED), ("dead-letter", CURSED + 1)],
    ids=["fail-os-exit", "dead-letter-sigkill"],
)
def test_a_flow_that_kills_its_worker_is_isolated(redis_url, tmp_path, on_error, order_id):
    path, lines = cursed_input(tmp_path, 1_000, 500, order_id)
    ns = new_namespace()
    run, took = ingest(path, redis_url, ns, "tests.flows.killer_cart:flow", on_error, 100)
    assert "Traceback" not in run.stderr
    assert "keep dying" not in run.stderr  # a poison pill, not a crash loop
    cause = "killed its worker: 2 worker processes died running epoch 500 (key 'u7')"
    if on_error == "fail":
        assert run.returncode == 65, run.stderr
        last = stderr_lines(run)[-1]
        assert last.startswith(f"orchestrator: {path}:501 (epoch 500): {cause}; ")
        assert "committed through epoch 499" in last and "fix the input" not in last
        assert run.stdout == reference_run(lines[:500])[0]
    else:
        assert run.returncode == 0, run.stderr
        [letter] = dead_letters(redis_url, ns)
        assert (letter["epoch"], letter["reason"]) == (500, cause)
        output, states = expected_without(lines, 500)
        assert run.stdout == output
        assert committed_states(redis_url, ns) == states
    assert took < 60
    assert no_workers_left(ns)
    # The ingest's log lines at default verbosity carry a UTC time and the level.
    logged = [x for x in run.stderr.splitlines() if not x.startswith("orchestrator")]
    assert all(LOG_LINE.fullmatch(x) for x in logged), run.stderr
    assert any(" WARNING ingest[" in x and "sending it again" in x for x in logged), run.stderr
