"""The benchmark still runs, and its two runs still write the same bytes (a small size)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_runs_small_and_its_outputs_match():
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--events", "20000", "--users", "2000", "--repeat", "2",
         "--growth-to", "30000", "--hot-key-orders", "300"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "output (1) == (2), byte for byte: True" in run.stdout
    assert "output after resume == (1):       True" in run.stdout
    assert "20,000 events, 2,000 users + 300 orders of one user" in run.stdout
    assert re.search(
        r"CPU per event of \(2\): driver [\d.]+ µs \(ceiling [\d,]+/s\), "
        r"redis [\d.]+ µs \(ceiling [\d,]+/s\)",
        run.stdout,
    )
    for figure in (
        "ratio (2)/(1)",
        "... of each pair of runs",
        "resume / full run",
        "Redis used_memory",
        "final states, JSON",
    ):
        assert figure in run.stdout
    growth = run.stdout.split("from 20,000 to 30,000 events of the same users:")[1]
    assert re.search(r"used_memory +[+-]\d+\.\d MB \(state hashes [+-]\d+\.\d MB, replay", growth)
    assert re.search(r"final states, JSON +[+-]\d+\.\d MB", growth)
    # Peak RSS is reported for every process of both runs, short-lived workers included
    # (a process the sampler never saw would show 0).
    for line in run.stdout.splitlines():
        if line.startswith(("(2)", "(3)")):
            peaks = line.split("   ")[-1]  # "driver 43, redis 14, worker 42/41 MB"
            assert "worker" in peaks and "driver" in peaks and "redis" in peaks, line
            assert all(int(mb) > 0 for mb in re.findall(r"\d+", peaks)), line


def test_the_worker_profile_runs_small_and_names_every_phase():
    run = subprocess.run(
        [sys.executable, "-m", "bench.worker", "--events", "4000", "--users", "500", "--batch", "1000"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    phases = re.findall(r"^(.+?)\s+(\d+\.\d+) us/event$", run.stdout, re.MULTILINE)
    names = [name.strip() for name, _ in phases]
    assert names[:3] == [
        "decode the stored batch",
        "parse and route its lines",
        "apply the flow (output lines too)",
    ]
    assert names[-1] == "total"
    assert float(phases[-1][1]) > 0


def test_the_driver_profile_runs_small_and_names_every_phase():
    run = subprocess.run(
        [sys.executable, "-m", "bench.driver", "--events", "3000", "--users", "300",
         "--batch-events", "500"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr  # (it checks every line was written)
    phases = re.findall(r"^(.+?)\s+(\d+\.\d+) us/event$", run.stdout, re.MULTILINE)
    assert [name.strip() for name, _ in phases] == [
        "read, key and buffer the lines",
        "frame the batches",
        "decode the notices",
        "merge and write the output lines",
        "total",
    ]
    assert float(phases[-1][1]) > 0
