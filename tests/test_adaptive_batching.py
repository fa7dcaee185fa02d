"""Batching adapts to the load: an idle partition is sent what was read at once; a partition
with a batch in flight collects the lines that come meanwhile into its next batch; with a
backlog to read, batches fill up.

The driver runs in-process on fakeredis over a followed file; a script between its reads
looks at what it sent (the stored batches, the RQ queues, the staged successors) and runs
RQ's worker in burst mode when a batch is to commit. LINGER is set far out, so that no
batch here is sent because time passed: what is sent depends on the mechanism alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import orchestrator.driver
import orchestrator.lineblock
from orchestrator.driver import Driver
from orchestrator.progress import Progress
from orchestrator.reader import LineSource
from tasks.batch import Batch
from tasks.keys import SLOTS, Keys, partition_of
from tasks.store import claim_partition

from helpers import run_queued_jobs

GENERATION = 1


class ScriptDone(Exception):
    """The script between the driver's reads has checked everything."""


class Script:
    """Housekeeping that runs one step of a generator at every turn of the driver's loop."""

    def __init__(self, steps: Iterator[None]) -> None:
        self.steps = steps

    def between_reads(self) -> None:
        try:
            next(self.steps)
        except StopIteration:
            raise ScriptDone from None

    def batches_wait(self) -> None:
        pass


def order(user: str, order_id: int) -> str:
    return json.dumps({"user_id": user, "type": "order", "order_id": order_id}) + "\n"


@pytest.fixture(autouse=True)
def _no_linger(monkeypatch):
    monkeypatch.setattr(orchestrator.driver, "LINGER", 1e9)


def follow(fake, tmp_path: Path, text: str, script: Callable[..., Iterator[None]], **options):
    """Run the driver over a followed file that starts with ``text`` until the script ends."""
    keys = Keys("adaptive")
    partitions = options.get("partitions", 4)
    path = tmp_path / "events.json"
    path.write_text(text)
    # What a run does first: own the namespace and claim its partitions.
    fake.hset(keys.meta, mapping={"generation": GENERATION, "partitions": partitions})
    for p in range(partitions):
        claim_partition(fake, keys, p, GENERATION)
    out = (tmp_path / "out").open("wb")
    driver = Driver(
        fake, keys, generation=GENERATION, partitions=partitions, slots=SLOTS,
        flow_path="tasks.cartjoin:flow", on_error="fail", out=out,
        housekeeping=Script(script(keys, path)), progress=Progress(enabled=False),
        on_commit=lambda *a, **k: None, batch_events=options.get("batch_events", 20_000),
        batch_timeout=60.0,
    )  # fmt: skip
    with out, path.open("rb") as f, pytest.raises(ScriptDone):
        driver.run(LineSource(f, 0, 0, follow=True, path=path))


def sent(fake, keys: Keys) -> list[list[int]]:
    """The epochs of every batch sent or staged so far (stored until its commit)."""
    batches = [Batch.decode(fake.get(k)) for k in fake.scan_iter(match=keys.batches_pattern)]
    return sorted(b.epochs for b in batches)


def queued(fake, keys: Keys, p: int) -> int:
    return fake.llen(keys.queue_key(p))


def staged(fake, keys: Keys, p: int) -> int:
    return fake.llen(keys.successor(GENERATION, p))


def test_an_idle_partition_is_sent_a_single_event_at_once(fake, tmp_path):
    def script(keys: Keys, path: Path) -> Iterator[None]:
        # After the first read: the one line is in its partition's queue, alone.
        assert sent(fake, keys) == [[0]]
        assert queued(fake, keys, partition_of("a", 4, SLOTS)) == 1
        yield

    follow(fake, tmp_path, order("a", 1), script)


def test_lines_that_come_while_a_batch_runs_make_its_partitions_next_batch(fake, tmp_path):
    p = partition_of("a", 4, SLOTS)

    def script(keys: Keys, path: Path) -> Iterator[None]:
        assert sent(fake, keys) == [[0]]
        with path.open("a") as f:
            f.write(order("a", 2) + order("a", 3) + order("a", 4))
        yield
        # Read, but neither queued nor staged: the partition's batch has not committed,
        # and a staged batch would be a batch of its own, not these lines with the next.
        assert sent(fake, keys) == [[0]]
        assert (queued(fake, keys, p), staged(fake, keys, p)) == (1, 0)
        run_queued_jobs(fake, keys, 4)
        for _ in range(3):  # the driver reads the commit's notice, then sends
            yield
        assert sent(fake, keys) == [[1, 2, 3]]
        assert queued(fake, keys, p) == 1

    follow(fake, tmp_path, order("a", 1), script)


@pytest.mark.parametrize("reading", ["blocks", "line by line"])
def test_with_a_backlog_to_read_a_batch_fills_up_before_it_is_sent(
    fake, tmp_path, monkeypatch, reading
):
    chunk = orchestrator.driver.READ_CHUNK
    lines = [order(f"u{i % 50}", i) for i in range(2 * chunk + 500)]
    if reading == "blocks":  # (blocks of lines of the cart's layout: 2.5 blocks in all)
        monkeypatch.setattr(orchestrator.lineblock, "BLOCK_BYTES", len("".join(lines)) * 2 // 5)
    else:
        monkeypatch.setenv("ORCHESTRATOR_TUNING", "-line-block")

    def script(keys: Keys, path: Path) -> Iterator[None]:
        # Whole chunks were read and more is there to read: nothing is sent yet.
        assert sent(fake, keys) == []
        yield
        assert sent(fake, keys) == []
        yield
        # The third read reached the end of the file: everything goes, as one batch.
        assert sent(fake, keys) == [list(range(len(lines)))]

    follow(fake, tmp_path, "".join(lines), script, partitions=1)
