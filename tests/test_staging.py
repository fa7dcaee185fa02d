"""A partition's next batch waits staged behind the running one; the running one's commit queues it."""

import json

import pytest
from test_store import SEED_LINES, batch, start

from bench.generate import generate
from tasks.jobs import run_batch
from tasks.keys import Keys

from conftest import REPO, cli_env, new_namespace, run_cli, stderr_lines
from model import cart_model

PICKY_FLOW = "tests.flows.picky_cart:flow"


def test_a_commit_queues_the_staged_next_batch_and_releases_the_lease(r, keys):
    start(r, keys)
    r.set(keys.lease(0), "the running job")
    r.rpush(keys.successor(1, 0), "the next job")
    run_batch(r, batch(keys, SEED_LINES[:2], -1, 1))
    assert r.lrange(keys.queue_key(0), 0, -1) == [b"the next job"]
    assert r.llen(keys.successor(1, 0)) == 0
    assert r.get(keys.lease(0)) is None


def test_keys_name_the_queue_as_rq_does(fake, keys):
    from rq import Queue

    assert keys.queue_key(2) == Queue(keys.queue_name(2), connection=fake).key


@pytest.mark.integration
def test_a_rejection_in_a_worker_stops_the_run_and_drops_the_staged_batch(
    redis_url, real, tmp_path
):
    lines = list(generate(6_000, 300, seed=4))
    cursed = json.dumps({"user_id": "u3", "type": "order", "order_id": 10**9})
    lines.insert(3_000, cursed)
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    ns = new_namespace()
    args = ["--redis-url", redis_url, "--namespace", ns, "--workers", "2", "--partitions", "2",
            "--batch-events", "300", "--flow", PICKY_FLOW]  # fmt: skip
    # (run from the repository: the flow is a module of its tests)
    first = run_cli("ingest", str(path), *args, cwd=REPO, env=cli_env())
    assert first.returncode == 65, first.stderr
    [message] = stderr_lines(first)
    assert f"{path}:3001 (epoch 3000): ValueError: order 1000000000 is cursed" in message
    # Nothing stays staged or queued behind the run that stopped.
    assert not list(real.scan_iter(match=Keys(ns).successors_pattern))
    left = [real.hget(job, "status") for job in real.scan_iter(match=f"rq:job:{ns}-*")]
    assert set(left) <= {b"finished"}, left  # (finished jobs are kept a few minutes)
    # Fixed, the input resumes at the rejected line, and the output is exact.
    lines[3_000] = json.dumps({"user_id": "u3", "type": "order", "order_id": 10**9 + 1})
    path.write_text("\n".join(lines) + "\n")
    second = run_cli("resume", str(path), *args, cwd=REPO, env=cli_env())
    assert second.returncode == 0, second.stderr
    assert first.stdout + second.stdout == cart_model([x.encode() for x in lines]).output
