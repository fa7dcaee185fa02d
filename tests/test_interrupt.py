"""Ctrl-C and SIGTERM stop a run at once, keep what it committed, and resume completes it.

A terminal's Ctrl-C sends SIGINT to every process of its foreground process
group: the command, its worker processes, and anything else they started. The
embedded redis-server runs in a session of its own (its keeper's), so it is not
among them: the command stops its workers, leaves the server, and exits 130
within moments, instead of retrying a server that the Ctrl-C had stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bench.generate import generate

from conftest import cli_env, run_cli
from helpers import keepers_of, merge_outputs, servers_in
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 200_000


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    lines = list(generate(EVENTS, 5_000, seed=11))
    path = tmp_path_factory.mktemp("interrupt") / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, reference_run(lines)[0]


def start_ingest(path, cwd, *options):
    """``orchestrator ingest`` in its own session (its own process group, as in a terminal)."""
    stdout = open(cwd / "run1.stdout", "w")  # noqa: SIM115 - closed by the test
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), *options],
        cwd=cwd, env=cli_env(), stdout=stdout, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    stdout.close()
    return proc


def wait_for_output(path, proc, at_least=20_000):
    """Wait until the run has written some output (it is past its start, well before its end)."""
    deadline = time.monotonic() + 60
    while not (path.exists() and path.stat().st_size >= at_least):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run wrote nothing for 60 s"
        time.sleep(0.01)


def interrupt(proc, how):
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        proc.send_signal(signal.SIGTERM)  # to the driver only
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    return time.monotonic() - sent, stderr


@pytest.mark.parametrize("output", ["stdout", "file"])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_ingest_exits_130_at_once_and_resume_completes_it(
    big_input, tmp_path, how, output
):
    path, expected = big_input
    options = ["--output", "out.txt"] if output == "file" else []
    proc = start_ingest(path, tmp_path, *options)
    wait_for_output(tmp_path / ("out.txt" if output == "file" else "run1.stdout"), proc)

    took, stderr = interrupt(proc, how)

    assert proc.returncode == 130, stderr
    assert took < 2.0, f"exited {took:.2f}s after the signal"
    assert "lost the connection" not in stderr
    assert "Traceback" not in stderr
    resume = f"orchestrator resume {path}" + (" --output out.txt" if output == "file" else "")
    assert stderr.splitlines()[-1] == (
        f"orchestrator: interrupted; committed epochs are kept: '{resume}' continues"
    )
    data_dir = (tmp_path / ".orchestrator").resolve()
    assert servers_in(data_dir) == [] and keepers_of(data_dir) == []
    # The server was stopped by the command that left it last, not by the signal.
    assert "Received SIGINT" not in (data_dir / "redis.log").read_text()

    resumed = run_cli("resume", str(path), *options, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    if output == "file":
        assert (tmp_path / "out.txt").read_text() == expected
    else:
        first = (tmp_path / "run1.stdout").read_text()
        assert merge_outputs(first, resumed.stdout) == expected


def test_a_second_ctrl_c_changes_nothing(big_input, tmp_path):
    path, expected = big_input
    proc = start_ingest(path, tmp_path, "--output", "out.txt")
    wait_for_output(tmp_path / "out.txt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr

    resumed = run_cli("resume", str(path), "--output", "out.txt", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "waiting" not in resumed.stderr  # the namespace was released: no lock to wait for
    assert (tmp_path / "out.txt").read_text() == expected
