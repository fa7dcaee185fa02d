"""The seed's crash-and-resume story with the CLI, embedded server, no Redis URL.

Each test starts in an empty directory holding the seed's sample data as
cart-join.json, exactly as a new user would.
"""

import shutil

import pytest

from conftest import SEED_FIRST_RUN, SEED_INPUT, SEED_RESUMED_RUN, run_cli
from reference import reference_run

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(SEED_INPUT, tmp_path / "cart-join.json")
    return tmp_path


@pytest.fixture
def crashed(workdir):
    """The seed's first run: it stops at the FAIL HERE line."""
    run = run_cli("ingest", "cart-join.json", cwd=workdir)
    assert run.stdout == SEED_FIRST_RUN
    assert run.returncode == 65
    return workdir, run


def test_ingest_prints_epochs_0_to_4_then_names_the_bad_line(crashed):
    _, run = crashed
    [message] = run.stderr.splitlines()
    assert "cart-join.json:6" in message
    assert "epoch 5" in message
    assert "invalid JSON" in message
    assert "orchestrator resume cart-join.json" in message
    assert "Traceback" not in run.stderr


def test_the_seeds_own_output_is_what_the_oracle_prints(crashed):
    # The expected texts above are the tutorial's; the oracle agrees with them.
    lines = SEED_INPUT.read_text().splitlines()
    assert reference_run(lines[:5])[0] == SEED_FIRST_RUN
    assert reference_run(lines, from_epoch=1, skip_bad=True)[0] == SEED_RESUMED_RUN


def test_replay_from_epoch_1_prints_the_seeds_six_resumed_lines(crashed):
    workdir, _ = crashed
    run = run_cli(
        "replay", "cart-join.json", "--from-epoch", "1", "--on-error", "skip", cwd=workdir
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == SEED_RESUMED_RUN
    assert "skipped 1 bad line: cart-join.json:6 (epoch 5)" in run.stderr


def test_resume_with_skip_prints_epochs_6_and_7(crashed):
    workdir, _ = crashed
    run = run_cli("resume", "cart-join.json", "--on-error", "skip", cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert run.stdout == SEED_RESUMED_RUN.split("\n", 4)[4]


def test_resume_after_deleting_the_bad_line_numbers_the_rest_5_and_6(crashed):
    workdir, _ = crashed
    path = workdir / "cart-join.json"
    path.write_text("".join(x for x in path.read_text().splitlines(True) if "FAIL" not in x))
    run = run_cli("resume", "cart-join.json", cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (
        '5 {"user_id": "a", "paid_order_ids": [2, 1], "unpaid_order_ids": []}\n'
        '6 {"user_id": "b", "paid_order_ids": [4], "unpaid_order_ids": [3]}\n'
    )


def test_a_finished_run_resumes_to_nothing_and_ingest_is_refused(crashed):
    workdir, _ = crashed
    run_cli("resume", "cart-join.json", "--on-error", "skip", cwd=workdir)
    again = run_cli("resume", "cart-join.json", cwd=workdir)
    assert (again.returncode, again.stdout) == (0, "")
    ingest = run_cli("ingest", "cart-join.json", cwd=workdir)
    assert ingest.returncode == 2
    for hint in ("resume", "replay", "reset"):
        assert hint in ingest.stderr


def test_replay_out_of_range_is_a_clear_error(crashed):
    workdir, _ = crashed
    for bad in ("6", "-1"):
        run = run_cli("replay", "cart-join.json", "--from-epoch", bad, cwd=workdir)
        assert run.returncode == 2
        assert "--from-epoch" in run.stderr and "0 to 5" in run.stderr
        assert "Traceback" not in run.stderr


def test_the_data_survives_between_commands_in_the_data_dir(crashed):
    workdir, _ = crashed
    assert (workdir / ".orchestrator" / "appendonly.aof").exists()
    status = run_cli("status", cwd=workdir)
    assert status.returncode == 0
    assert "committed epoch: 4" in status.stdout
