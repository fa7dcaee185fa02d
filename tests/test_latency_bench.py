"""The latency benchmark runs, and matches every event's output line to the event."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_latency_bench_matches_every_event_and_prints_percentiles_per_source():
    run = subprocess.run(
        [sys.executable, "-m", "bench.latency", "--rate", "200", "--seconds", "1",
         "--source", "file", "--source", "stdin", "--source", "stream"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    figures = r" +200 events matched +p50 +[\d.]+ +p95 +[\d.]+ +p99 +[\d.]+ +max +[\d.]+$"
    for source in ("file", "stdin", "stream"):
        assert re.search(f"^{source}{figures}", run.stdout, re.MULTILINE), source
