"""A user flow (examples/running_sum.py) on real worker processes, with the same recovery."""

import json
import random

import pytest

from conftest import REPO, cli_env, new_namespace, run_cli

pytestmark = pytest.mark.integration

FLOW = "examples.running_sum:flow"
BAD_EPOCH = 4_000


def movements(n, accounts, seed):
    rng = random.Random(seed)
    lines = []
    for epoch in range(n):
        account = f"acct{rng.randrange(accounts)}"
        if epoch == BAD_EPOCH:
            lines.append(json.dumps({"account": account, "amount": "12"}))  # wrong type
        elif rng.random() < 0.02:
            lines.append(json.dumps({"account": account, "close": True}))
        elif rng.random() < 0.05:
            lines.append(json.dumps({"account": account, "note": "no amount"}))
        else:
            lines.append(json.dumps({"account": account, "amount": rng.randrange(-50, 100)}))
    return lines


def expected_output(lines, from_epoch=0):
    """The running balances, computed independently of the engine."""
    balances, out = {}, []
    for epoch, line in enumerate(lines):
        event = json.loads(line)
        account = event["account"]
        state = balances.get(account, {"balance": 0, "movements": 0})
        if event.get("close") is True:
            balances.pop(account, None)
            item = {"account": account, "closed": True, **state}
        elif isinstance(event.get("amount"), int):
            state = {
                "balance": state["balance"] + event["amount"],
                "movements": state["movements"] + 1,
            }
            balances[account] = state
            item = {"account": account, "closed": False, **state}
        else:
            continue  # filtered out, or rejected (skipped)
        if epoch >= from_epoch:
            out.append(f"{epoch} {json.dumps(item)}\n")
    return "".join(out)


def test_running_sum_through_the_cli_with_fail_resume_and_replay(redis_url, tmp_path):
    lines = movements(10_000, 300, seed=11)
    path = tmp_path / "movements.json"
    path.write_text("\n".join(lines) + "\n")
    args = ["--redis-url", redis_url, "--namespace", new_namespace(), "--workers", "2"]

    def cli(*more):
        # From the repository root, where examples/ is importable, as the README says.
        return run_cli(*more, *args, cwd=REPO, env=cli_env())

    first = cli("ingest", str(path), "--flow", FLOW, "--partitions", "4")
    assert first.returncode == 65, first.stderr
    assert f"movements.json:{BAD_EPOCH + 1} (epoch {BAD_EPOCH})" in first.stderr
    assert "TypeError: amount must be an integer, got '12'" in first.stderr
    assert first.stdout == expected_output(lines[:BAD_EPOCH])

    # resume takes the namespace's flow without being told again.
    second = cli("resume", str(path), "--on-error", "skip")
    assert second.returncode == 0, second.stderr
    assert first.stdout + second.stdout == expected_output(lines)

    # Replay from an epoch: closed accounts stay closed, balances as of epoch N-1.
    replay = cli("replay", str(path), "--from-epoch", "7000", "--on-error", "skip")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == expected_output(lines, from_epoch=7000)


def test_a_flow_from_main_is_refused_with_advice(tmp_path):
    (tmp_path / "in.json").write_text("{}\n")
    run = run_cli("ingest", "in.json", "--flow", "__main__:flow", cwd=tmp_path)
    assert run.returncode == 2
    assert "RQ workers cannot import" in run.stderr and "run_main" in run.stderr
