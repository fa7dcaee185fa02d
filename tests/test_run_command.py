"""``orchestrator run FILE``: an ingest on a namespace without committed epochs, a resume
otherwise, so that a supervisor can start the same command again after any stop."""

from __future__ import annotations

import pytest

from bench.generate import generate

from conftest import REPO, new_namespace, run_cli
from helpers import committed_states
from reference import reference_run

pytestmark = pytest.mark.integration


def test_run_starts_an_empty_namespace_then_continues_it_after_the_file_grew(redis_url, tmp_path):
    lines = list(generate(300, 20, seed=4))
    path, out = tmp_path / "events.json", tmp_path / "out.txt"
    path.write_text("".join(x + "\n" for x in lines[:120]))
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1", "--output", str(out)]

    first = run_cli("run", str(path), *args, cwd=REPO)
    assert first.returncode == 0, first.stderr
    assert out.read_text() == reference_run(lines[:120])[0]

    with open(path, "a") as f:
        f.write("".join(x + "\n" for x in lines[120:]))
    second = run_cli("run", str(path), *args, cwd=REPO)
    assert second.returncode == 0, second.stderr
    assert "done: 180 events, committed through epoch 299" in second.stderr  # only the new ones
    expected_out, expected_states = reference_run(lines)
    assert out.read_text() == expected_out
    assert committed_states(redis_url, ns) == expected_states


def test_run_after_a_run_that_stopped_at_a_bad_line_resumes_past_it_when_told_to_skip(
    redis_url, tmp_path
):
    lines = list(generate(50, 5, seed=8))
    lines.insert(20, "FAIL HERE")
    path, out = tmp_path / "events.json", tmp_path / "out.txt"
    path.write_text("".join(x + "\n" for x in lines))
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1", "--output", str(out)]

    stopped = run_cli("run", str(path), *args, cwd=REPO)
    assert stopped.returncode == 65, stopped.stderr
    went_on = run_cli("run", str(path), *args, "--on-error", "skip", cwd=REPO)
    assert went_on.returncode == 0, went_on.stderr
    assert out.read_text() == reference_run(lines, skip_bad=True)[0]


def test_run_refuses_what_resume_refuses_a_changed_input(redis_url, tmp_path):
    lines = list(generate(40, 5, seed=2))
    path = tmp_path / "events.json"
    path.write_text("".join(x + "\n" for x in lines))
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "1"]
    assert run_cli("run", str(path), *args, cwd=REPO).returncode == 0
    path.write_text("".join(x + "\n" for x in reversed(lines)))
    again = run_cli("run", str(path), *args, cwd=REPO)
    assert again.returncode == 66, again.stderr
    assert "has changed before the resume point" in again.stderr
