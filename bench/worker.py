"""Where a worker's CPU goes on one batch, without Redis: per-event costs of each phase.

    python -m bench.worker [--events 400000] [--users 100000] [--batch 40000]

It generates cart events, applies all but the last ``--batch`` epochs of
partition 0 to build its states, then times (best of 5) each phase a worker
runs for a batch of the last ``--batch`` epochs: decoding the stored batch,
parsing and routing its lines, applying the flow, encoding the undo record and
the notice, and packing the HMGET and HSET commands (``tasks/resp.py``). Figures are
microseconds per event of the batch; they are measurements, not a test. They
move with the state of the process's heap (docs/performance.md): compare phases,
and changes measured side by side, rather than absolute figures across tools.
"""

from __future__ import annotations

import argparse

import orjson

from bench.generate import generate
from bench.phases import Phases
from tasks.apply import apply_events
from tasks.batch import Batch, CommitNotice
from tasks.cartjoin import FLOW_PATH
from tasks.flow import load_flow
from tasks.jobs import batch_events
from tasks.keys import SLOTS, partition_of
from tasks.resp import packed

PARTITIONS = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=40_000, help="epochs in the timed batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.batch < args.events:
        parser.error("--batch must be between 1 and --events - 1")

    flow = load_flow(FLOW_PATH)
    split = args.events - args.batch
    earlier: tuple[list[int], list[bytes]] = ([], [])
    later: tuple[list[int], list[bytes]] = ([], [])
    for epoch, text in enumerate(generate(args.events, args.users, args.seed)):
        line = text.encode()
        if partition_of(orjson.loads(line)["user_id"], PARTITIONS, SLOTS) == 0:
            part = earlier if epoch < split else later
            part[0].append(epoch)
            part[1].append(line)

    def batch_of(after: int, last: int, part: tuple[list[int], list[bytes]]) -> Batch:
        return Batch("bench", 1, 0, PARTITIONS, after, last, FLOW_PATH, "fail", *part, slots=SLOTS)

    # The states before the timed batch, built batch by batch as a worker would (one
    # batch of all of it leaves a heap that makes every later phase slower).
    states: dict[str, bytes | None] = {}
    size = len(later[0])
    for start in range(0, len(earlier[0]), size):
        epochs, lines = earlier[0][start : start + size], earlier[1][start : start + size]
        last = split - 1 if start + size >= len(earlier[0]) else epochs[-1]
        events = batch_events(batch_of(epochs[0] - 1, last, (epochs, lines)))
        loaded = {key: states.get(key) for _, key, _ in events}
        states.update(apply_events(flow, events, loaded, last, "fail").writes)
    batch = batch_of(split - 1, args.events - 1, later)
    stored = batch.encode()

    n = len(batch.lines)
    print(f"partition 0 of {PARTITIONS}: a batch of {n:,} events after {len(earlier[0]):,}")
    phases = Phases(runs=5)
    timed = phases.timed
    decoded = timed("decode the stored batch", lambda: Batch.decode(stored))
    events = timed("parse and route its lines", lambda: batch_events(decoded))
    wanted = list(dict.fromkeys(key for _, key, _ in events))
    loaded = {key: states.get(key) for key in wanted}
    applied = timed(
        "apply the flow (output lines too)",
        lambda: apply_events(flow, events, loaded, args.events - 1, "fail"),
    )
    timed("encode the undo record", applied.encode_undo)
    timed(
        "encode the notice",
        lambda: CommitNotice.encode_outputs(
            0, applied.applied_through, applied.out_epochs, applied.out_items, [], None
        ),
    )
    sets = [x for key, raw in applied.writes.items() for x in (key, raw)]
    timed("pack HMGET", lambda: packed("HMGET", "state", *wanted))
    timed("pack HSET", lambda: packed("HSET", "state", *sets))

    phases.print(n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
