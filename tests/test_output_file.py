"""--output FILE is exactly-once: after a crash and resume it equals a clean run's file."""

import signal
import subprocess
import sys
import time

import pytest

from bench.generate import generate
from tasks.keys import Keys

from conftest import REPO, cli_env, new_namespace, run_cli
from reference import reference_run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kills", [1, 3])
def test_a_killed_driver_leaves_an_output_file_that_resume_completes_exactly(
    redis_url, real, tmp_path, kills
):
    lines = list(generate(5_000, 300, seed=kills))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2", "--output", str(out)]
    command = [
        "ingest",
        str(path),
        *args,
        "--partitions",
        "3",
        "--flow",
        "tests.flows.slow_cart:flow",
    ]
    for k in range(kills):
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *command],
            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        target = 1_000 * (k + 1)
        while int(real.hget(Keys(ns).meta, "committed") or -1) < target:
            assert driver.poll() is None, driver.stderr.read()
            time.sleep(0.01)
        time.sleep(0.05 * k)  # somewhere after a record, before the next one
        driver.send_signal(signal.SIGKILL)
        driver.communicate()
        command = ["resume", str(path), *args]
    # Lines written after the last record may be in the file now; resume cuts them off.
    resumed = run_cli(*command, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == reference_run(lines)[0]


def test_replay_cuts_the_output_file_back_to_the_replayed_epoch(redis_url, tmp_path):
    lines = list(generate(3_000, 200, seed=9))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    args = ["--redis-url", redis_url, "--namespace", new_namespace(), "--workers", "1"]
    assert run_cli("ingest", str(path), *args, "--output", str(out), cwd=tmp_path).returncode == 0
    replay = run_cli(
        "replay", str(path), *args, "--from-epoch", "1234", "--output", str(out), cwd=tmp_path
    )
    assert replay.returncode == 0, replay.stderr
    # The same file as a clean run's: epochs 0-1233 kept, 1234 on written again once.
    assert out.read_text() == reference_run(lines)[0]


def test_an_output_file_changed_by_someone_else_is_refused(redis_url, tmp_path):
    lines = list(generate(500, 50, seed=4))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n" + "FAIL HERE\n" + "\n".join(lines[:10]) + "\n")
    out = tmp_path / "out.txt"
    args = [
        "--redis-url",
        redis_url,
        "--namespace",
        new_namespace(),
        "--workers",
        "1",
        "--output",
        str(out),
    ]
    assert run_cli("ingest", str(path), *args, cwd=tmp_path).returncode == 65
    out.write_text(out.read_text()[:100])
    run = run_cli("resume", str(path), *args, "--on-error", "skip", cwd=tmp_path)
    assert run.returncode == 66
    assert "shorter" in run.stderr and "out.txt" in run.stderr


def test_resume_refuses_an_output_file_that_does_not_confirm_the_record(tmp_path):
    from orchestrator.sink import ends_with_epoch

    path = tmp_path / "out.txt"
    path.write_bytes(b'0 {"a": 1}\n1 {"a": 2}\n2 {"a": 3}\n')
    assert ends_with_epoch(path, 22, 1)  # the record: epochs 0 and 1, 22 bytes
    assert ends_with_epoch(path, 0, -1)
    assert not ends_with_epoch(path, 21, 1)  # not at the end of a line
    assert not ends_with_epoch(path, 22, 0)  # its last line is of a later epoch
    assert not ends_with_epoch(path, 11, 1)  # the line after it is of an earlier epoch
    long_line = b"7 " + b"x" * 100_000 + b"\n"
    path.write_bytes(long_line)
    assert ends_with_epoch(path, len(long_line), 7)  # a last line longer than the window


def test_a_resume_may_start_an_output_file_after_runs_to_stdout(redis_url, tmp_path):
    lines = list(generate(1_000, 50, seed=9))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines[:600]) + "\n")
    args = ["--redis-url", redis_url, "--namespace", new_namespace(), "--workers", "1"]
    first = run_cli("ingest", str(path), *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    with open(path, "a") as f:
        f.write("\n".join(lines[600:]) + "\n")

    resumed = run_cli("resume", str(path), *args, "--output", "rest.txt", cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "rest.txt").read_text() == reference_run(lines, from_epoch=600)[0]
