"""The chaos run, bounded for CI: 50,000 events, 10 worker SIGKILLs, 2 driver SIGKILLs; and
40,000 events with a few of each fault, pauses and a Redis that lost writes among them.

The long version runs by hand: ``make chaos`` (see README).
"""

import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_chaos_run_loses_nothing_and_applies_nothing_twice(redis_url):
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--events", "50000", "--users", "5000",
         "--worker-kills", "10", "--driver-kills", "2", "--redis-url", redis_url],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    print(run.stdout)  # the seed and the figures, shown by pytest -s or on failure
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mismatches:             0" in run.stdout
    assert "worker SIGKILLs:        10" in run.stdout
    assert "driver SIGKILLs:        2\n" in run.stdout


def test_chaos_run_with_pauses_and_lost_writes_ends_exact(redis_url):
    """Workers and a driver paused and woken up, and Redis restarted from an append-only
    file that lost its tail: every driver run ends done, killed, refused for lost data
    (3) or superseded (75), and the output and states are exact."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--events", "40000", "--users", "4000",
         "--worker-kills", "2", "--worker-pauses", "2", "--driver-kills", "1",
         "--driver-pauses", "1", "--redis-cuts", "1"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mismatches:             0" in run.stdout
    assert "worker pauses:          2" in run.stdout
    assert "driver pauses:          1" in run.stdout
    assert "Redis cuts:             1" in run.stdout
