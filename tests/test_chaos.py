"""The chaos run, bounded for CI: 50,000 events, 10 worker SIGKILLs, 2 driver SIGKILLs.

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
    assert "driver SIGKILLs:        2 " in run.stdout
