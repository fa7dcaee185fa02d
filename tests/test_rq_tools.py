"""Plain RQ tools on our queues: `rq info` sees them, a plain `rq worker` runs our jobs."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from bench.generate import generate
from tasks.keys import Keys

from conftest import cli_env, new_namespace, run_cli
from reference import reference_run

pytestmark = pytest.mark.integration

RQ = os.path.join(os.path.dirname(sys.executable), "rq")


def test_rq_info_lists_the_partition_queues_and_our_workers(redis_url, tmp_path):
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "worker", *args],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        for w in workers:  # each says it waits until the first ingest creates the namespace
            w.stderr.readline()
        (tmp_path / "in.json").write_text("\n".join(generate(200, 20, seed=1)) + "\n")
        run = run_cli("ingest", "in.json", *args, "--partitions", "3", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        queues = Keys(ns).queue_names(3)
        info = subprocess.run(
            [RQ, "info", "--url", redis_url, *queues], capture_output=True, text=True, timeout=60
        )
    finally:
        for w in workers:
            w.terminate()
            w.communicate(timeout=30)
    assert info.returncode == 0, info.stderr
    for queue in queues:
        assert queue in info.stdout
    assert "2 workers, 3 queues" in info.stdout


def test_a_plain_rq_worker_from_the_status_command_line_runs_our_jobs(redis_url, tmp_path):
    lines = list(generate(3_000, 300, seed=6))
    (tmp_path / "in.json").write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns]
    # A first ingest creates the namespace; its status then gives the worker's command line.
    (tmp_path / "first.json").write_text(lines[0] + "\n")
    assert run_cli("ingest", "first.json", *args, "--workers", "1", cwd=tmp_path).returncode == 0
    status = json.loads(run_cli("status", "--json", *args, cwd=tmp_path).stdout)
    command = status["rq_worker_command"]
    assert command.startswith("rq worker --url ") and "--serializer json" in command
    assert "--dequeue-strategy round_robin" in command  # as our own workers take the queues
    argv = [RQ if a == "rq" else a for a in shlex.split(command.replace("$REDIS_URL", redis_url))]
    worker = subprocess.Popen(
        argv,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its work horses too can be killed as a group
    )
    try:
        run_cli("reset", "--yes", *args, cwd=tmp_path)
        # The plain RQ worker (forking, JSON serializer) does all the work of this run.
        run = run_cli("ingest", "in.json", *args, "--partitions", "4", cwd=tmp_path)
    finally:
        logs = _stop(worker)
    assert logs is not None, (
        f"the plain rq worker did not stop within 60 s of SIGTERM (the ingest exited "
        f"{run.returncode}: {run.stderr[-500:]})"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference_run(lines)[0]
    assert "Job OK" in logs


def _stop(worker: subprocess.Popen) -> str | None:
    """SIGTERM a plain RQ worker and return its log; None if it had to be killed.

    RQ 3.0's worker is still "busy" between its stop check and its next dequeue: a SIGTERM
    there only sets a flag, and the worker then blocks in BLPOP for its dequeue timeout
    (rq/worker/base.py, _shutdown; seen here as a worker outliving its SIGTERM by minutes).
    A second signal after 5 s is RQ's cold shutdown; a worker that outlives both is killed,
    and its log goes to the test's output.
    """
    for wait in (5, 55):
        worker.send_signal(signal.SIGTERM)
        try:
            logs, _ = worker.communicate(timeout=wait)
            return logs
        except subprocess.TimeoutExpired:
            pass
    os.killpg(worker.pid, signal.SIGKILL)
    logs, _ = worker.communicate()
    print(f"the plain rq worker's log:\n{logs}")
    return None


def test_a_forked_workers_rq_name_says_namespace_host_and_pid_and_finished_jobs_are_kept(
    redis_url, real, tmp_path
):
    from orchestrator.dispatch import RESULT_TTL

    ns = new_namespace()
    (tmp_path / "in.json").write_text("\n".join(generate(200, 20, seed=2)) + "\n")
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1", "--partitions", "2"]
    run = run_cli("ingest", "in.json", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # The worker registered its death (RQ keeps the key for a minute): its name and pid.
    [key] = real.scan_iter(match=f"rq:worker:{ns}@*")
    name = key.decode().removeprefix("rq:worker:")
    pid = int(real.hget(key, "pid"))
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    assert re.fullmatch(rf"{re.escape(ns)}@{re.escape(host)}\.{pid}\.[0-9a-f]{{4}}", name), name
    assert real.hget(key, "hostname").decode() == socket.gethostname()
    # RQ counts the batches finished in the last minutes (rq info, rq-dashboard)
    names = Keys(ns).queue_names(2)
    finished = [job for name in names for job in real.zrange(f"rq:finished:{name}", 0, -1)]
    assert finished
    for job in finished:
        assert real.hget(f"rq:job:{job.decode()}", "status") == b"finished"
        assert 0 < real.ttl(f"rq:job:{job.decode()}") <= RESULT_TTL
