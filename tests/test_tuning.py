"""The tuning knobs change time and memory only: every one can be switched off, and the
pipeline's output is the same with or without them."""

from __future__ import annotations

import pytest

from tasks.tuning import KNOBS, enabled

from conftest import SEED_INPUT, cli_env, run_cli
from reference import reference_run


@pytest.mark.parametrize(
    ("switch", "off"),
    [
        (None, set()),
        ("1", set()),
        ("0", set(KNOBS)),
        ("off", set(KNOBS)),
        ("-gc,-malloc", {"gc", "malloc"}),
        ("rq", {"rq"}),
        (" -encoder , fast-exit ", {"encoder", "fast-exit"}),
    ],
)
def test_the_switch_turns_off_the_knobs_it_names(monkeypatch, switch, off):
    if switch is None:
        monkeypatch.delenv("ORCHESTRATOR_TUNING", raising=False)
    else:
        monkeypatch.setenv("ORCHESTRATOR_TUNING", switch)
    assert {knob for knob in KNOBS if not enabled(knob)} == off


@pytest.mark.integration
def test_a_run_without_any_tuning_gives_the_same_output(tmp_path):
    lines = [x for x in SEED_INPUT.read_text().splitlines() if x != "FAIL HERE"]
    (tmp_path / "events.json").write_text("\n".join(lines) + "\n")
    run = run_cli(
        "ingest", "events.json", "--output", "out.txt", cwd=tmp_path,
        env=cli_env(ORCHESTRATOR_TUNING="0"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.txt").read_text() == reference_run(lines)[0]
