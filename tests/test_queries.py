"""`state KEY [--at-epoch N]` and `status --json` on a real Redis."""

import json
import random
import shlex

import pytest

from bench.generate import generate

from conftest import SEED_INPUT, new_namespace, run_cli
from reference import reference_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generated_run(redis_url, tmp_path_factory):
    lines = list(generate(4_000, 200, seed=13))
    cwd = tmp_path_factory.mktemp("queries")
    (cwd / "in.json").write_text("\n".join(lines) + "\n")
    args = ["--redis-url", redis_url, "--namespace", new_namespace()]
    run = run_cli("ingest", "in.json", *args, "--workers", "2", "--partitions", "3", cwd=cwd)
    assert run.returncode == 0, run.stderr
    return lines, args, cwd


def state(args, cwd, key, *more):
    run = run_cli("state", key, "--json", *args, *more, cwd=cwd)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_state_now_and_as_of_any_retained_epoch_equals_the_plain_loop(generated_run):
    lines, args, cwd = generated_run
    rng = random.Random(3)
    _, final = reference_run(lines)
    for key in rng.sample(sorted(final), 3):
        now = state(args, cwd, key)
        assert (now["key"], now["epoch"], now["state"]) == (key, 3_999, final[key])
    for epoch in (0, 17, 1_000, 2_345, 3_998):
        _, then = reference_run(lines[: epoch + 1])
        for key in rng.sample(sorted(final), 4):
            found = state(args, cwd, key, "--at-epoch", str(epoch))
            assert found["state"] == then.get(key), (key, epoch)


def test_state_of_the_seed_keys_and_its_errors(redis_url, tmp_path):
    (tmp_path / "cart-join.json").write_text(SEED_INPUT.read_text())
    args = ["--redis-url", redis_url, "--namespace", new_namespace()]
    run = run_cli(
        "ingest", "cart-join.json", *args, "--workers", "1", "--on-error", "skip", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert state(args, tmp_path, "a")["state"] == {"unpaid_order_ids": [], "paid_order_ids": [2, 1]}
    assert state(args, tmp_path, "a", "--at-epoch", "3")["state"] == {
        "unpaid_order_ids": [1],
        "paid_order_ids": [2],
    }
    assert state(args, tmp_path, "b", "--at-epoch", "1")["state"] is None  # b's first event: 2
    assert state(args, tmp_path, "nobody")["state"] is None
    text = run_cli("state", "a", "--at-epoch", "0", *args, cwd=tmp_path)
    assert text.stdout.startswith("a (partition ") and '{"unpaid_order_ids": [1]' in text.stdout
    out_of_range = run_cli("state", "a", "--at-epoch", "8", *args, cwd=tmp_path)
    assert out_of_range.returncode == 2 and "out of range" in out_of_range.stderr


def test_status_json_reports_progress_backlog_rate_workers_and_retention(generated_run):
    _, args, cwd = generated_run
    report = json.loads(run_cli("status", "--json", *args, cwd=cwd).stdout)
    assert report["committed_epoch"] == 3_999
    assert report["read_epoch"] == 3_999 and report["lag_epochs"] == 0
    assert report["events_per_s"] > 0
    assert report["retention"] == {"retain_epochs": 100_000, "replayable_from": 0}
    assert report["dead_letters"] == 0
    assert report["driver"] is None and report["workers"] == 0
    assert [row["partition"] for row in report["partition_progress"]] == [0, 1, 2]
    assert all(
        row["backlog_events"] == 0 and row["queued_jobs"] == 0
        for row in report["partition_progress"]
    )
    assert max(row["applied_through"] for row in report["partition_progress"]) == 3_999
    assert report["rq_worker_command"].endswith(" ".join(shlex.quote(q) for q in report["queues"]))
