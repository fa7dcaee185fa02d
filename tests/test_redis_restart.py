"""Redis restarted mid-run: the run rides it out (or fails clearly), and resume is exact."""

import subprocess
import sys
import time

import pytest

from bench.generate import generate

from conftest import REPO, cli_env, new_namespace, run_cli
from helpers import committed_epoch, committed_states, merge_outputs
from reference import reference_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_redis_killed_and_restarted_mid_run(own_redis, tmp_path):
    lines = list(generate(6_000, 400, seed=33))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    args = ["--redis-url", own_redis.url, "--namespace", ns, "--workers", "2"]
    with open(tmp_path / "first.out", "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "ingest", str(path), *args,
             "--partitions", "3", "--flow", "tests.flows.slow_cart:flow", "--batch-events", "300"],
            cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while (before := committed_epoch(own_redis.url, ns)) < 1_500:
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.02)
        assert before < len(lines) - 1  # the restart comes mid-run
        own_redis.kill()  # SIGKILL: only what the append-only file holds survives
        time.sleep(1.5)
        own_redis.start()
        _, stderr = driver.communicate(timeout=180)
    # No epoch reported committed before the restart is lost.
    assert committed_epoch(own_redis.url, ns) >= before
    assert "lost the connection to Redis" in stderr
    # The run either rode the restart out or stopped with a clear message (exit 3).
    assert driver.returncode in (0, 3), stderr
    assert "Traceback" not in stderr
    resumed = run_cli("resume", str(path), *args, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    expected_out, expected_states = reference_run(lines)
    first = (tmp_path / "first.out").read_text()
    assert merge_outputs(first, resumed.stdout) == expected_out
    assert committed_states(own_redis.url, ns) == expected_states
