"""Several commands on one data directory share its embedded server.

The server stays up while any command is attached to it and stops when the last
one leaves; a command killed with SIGKILL leaves nothing running; an
``orchestrator worker`` that joined it ends quietly with it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from bench.generate import generate
from tasks.keys import Keys

from conftest import cli_env, run_cli
from helpers import keepers_of, servers_in
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_events(path, events, seed):
    lines = list(generate(events, 2_000, seed=seed))
    path.write_text("\n".join(lines) + "\n")
    return reference_run(lines)[0]


def start(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_second_ingest_on_the_data_directory_outlives_the_first(tmp_path):
    first_expected = write_events(tmp_path / "first.json", 100_000, seed=1)
    second_expected = write_events(tmp_path / "second.json", 250_000, seed=2)
    first = start("ingest", "first.json", "--namespace", "n1", "--output", "n1.txt", cwd=tmp_path)
    wait_for(lambda: (tmp_path / "n1.txt").exists() and (tmp_path / "n1.txt").stat().st_size, "n1")

    second = start("ingest", "second.json", "--namespace", "n2", "--output", "n2.txt", cwd=tmp_path)
    _, first_err = first.communicate(timeout=120)
    first_ended = time.monotonic()
    assert second.poll() is None, "the second run must still be running when the first ends"
    _, second_err = second.communicate(timeout=120)

    assert first.returncode == 0, first_err
    assert second.returncode == 0, second_err
    assert time.monotonic() > first_ended
    assert "lost the connection" not in first_err + second_err
    assert (tmp_path / "n1.txt").read_text() == first_expected
    assert (tmp_path / "n2.txt").read_text() == second_expected
    data_dir = (tmp_path / ".orchestrator").resolve()
    assert servers_in(data_dir) == [] and keepers_of(data_dir) == []


def test_status_calls_beside_ingest_starts_never_fail(tmp_path):
    expected = write_events(tmp_path / "events.json", 3_000, seed=3)
    statuses: list[subprocess.CompletedProcess] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            statuses.append(run_cli("status", cwd=tmp_path))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        runs = []
        for i in range(5):
            runs.append(run_cli("ingest", "events.json", "--namespace", f"s{i}", cwd=tmp_path))
            time.sleep(0.05 * i)  # ingests start at varied points of a status call
    finally:
        stop.set()
        asker.join()
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout == expected
    assert len(statuses) >= 3
    for status in statuses:
        assert status.returncode == 0, status.stderr


def test_a_joined_worker_exits_0_quietly_when_the_run_ends(tmp_path):
    expected = write_events(tmp_path / "events.json", 20_000, seed=4)
    driver = start("ingest", "events.json", "--workers", "0", cwd=tmp_path)
    wait_for(lambda: started_run(tmp_path / ".orchestrator"), "the run to start")
    worker = start("worker", cwd=tmp_path)

    stdout, driver_err = driver.communicate(timeout=120)
    _, worker_err = worker.communicate(timeout=30)

    assert driver.returncode == 0, driver_err
    assert stdout == expected
    assert worker.returncode == 0, worker_err
    assert worker_err.splitlines() == [
        f"orchestrator: using the embedded server in {(tmp_path / '.orchestrator').resolve()} "
        f"(pid {named_pid(driver_err, worker_err)}) while commands run there"
    ]


def started_run(data_dir) -> bool:
    """Whether the run on the embedded server of ``data_dir`` has set up its namespace."""
    try:
        url = json.loads((data_dir / "server.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        return False
    client = redis.Redis.from_url(url)
    try:
        return client.hget(Keys("cart-join").meta, "partitions") is not None
    except redis.RedisError:
        return False
    finally:
        client.close()


def named_pid(*texts):
    """The server pid the worker named (it is gone by now; the line says which it was)."""
    for text in texts:
        for line in text.splitlines():
            if "(pid " in line:
                return int(line.split("(pid ", 1)[1].split(")", 1)[0])
    raise AssertionError("no pid in the worker's line")


def test_a_killed_command_leaves_no_server_and_no_listening_worker(tmp_path):
    write_events(tmp_path / "events.json", 200_000, seed=5)
    run = start("ingest", "events.json", "--output", "out.txt", cwd=tmp_path)
    wait_for(
        lambda: (tmp_path / "out.txt").exists() and (tmp_path / "out.txt").stat().st_size, "out"
    )
    data_dir = (tmp_path / ".orchestrator").resolve()
    assert len(servers_in(data_dir)) == 1 and len(keepers_of(data_dir)) == 1
    run.send_signal(signal.SIGKILL)  # its workers get SIGTERM when it dies; its server is left
    run.communicate(timeout=30)

    wait_for(lambda: not servers_in(data_dir) and not keepers_of(data_dir), "the keeper", 10)

    status = run_cli("status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["workers"] == 0
    resumed = run_cli("resume", "events.json", "--output", "out.txt", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr


# A command that attaches while another is starting the server reads its record with keeper 0
# (the keeper is not started yet); when it is the last to leave, it stops the server and kills
# the keeper by the recorded pid. It used to run os.kill(0, SIGKILL): its own process group,
# which was the test suite's (CI ended with exit 137) or a user's shell job.
LAST_TO_LEAVE_WITH_KEEPER_0 = """
import json, os, signal, sys
from pathlib import Path
from orchestrator.embedded import attach, detach, terminate_server
from orchestrator.keeper import SERVER_INFO

data = Path(sys.argv[1])
first = attach(data)
info = data / SERVER_INFO
record = json.loads(info.read_text())
info.write_text(json.dumps({**record, "keeper": 0}))  # (as while its keeper starts)
second = attach(data)
assert second.keeper_pid == 0, second
info.write_text(json.dumps(record))
detach(first, terminate_server)
# (the keeper would stop the server if it saw nobody attached first: it is gone, so that
# the second command is the last to leave for sure)
os.kill(record["keeper"], signal.SIGKILL)
first.keeper.reap(wait=True)
detach(second, terminate_server)  # the last to leave: it stops the server
print("left")
"""


def test_the_last_command_to_leave_never_signals_its_own_process_group(tmp_path):
    data = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, "-c", LAST_TO_LEAVE_WITH_KEEPER_0, str(data)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60,
        start_new_session=True,  # (killing its own group must not reach the test suite's)
    )  # fmt: skip
    assert (run.returncode, run.stdout) == (0, "left\n"), run.stderr
    deadline = time.monotonic() + 10
    while (servers_in(data) or keepers_of(data)) and time.monotonic() < deadline:
        time.sleep(0.05)  # (the keeper leaves by itself once the server is gone)
    assert servers_in(data) == [] and keepers_of(data) == []
