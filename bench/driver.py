"""Where the driver's CPU goes, without Redis: per-event costs of the phases of its loop.

    python -m bench.driver [--events 400000] [--users 100000] [--partitions 4]
                           [--batch-events 20000]

It writes the bench's cart events to a file, then times (best of 3) what the driver
does with them in its own process: reading the lines, finding each one's key and
partition and buffering it for its batch (``Driver._read_chunk``); framing each batch
for Redis (``Batch.encode``); and, for the commit notices the workers would send back
(their output lines made beforehand by the flow, as a worker makes them), decoding
them, merging the partitions' lines in epoch order and writing them to a file. The
driver's round trips to Redis (sending batches, reading notices) are not in it:
``python -m bench`` measures the whole run. Figures are microseconds per event; they
move with the machine, so compare changes side by side.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import fakeredis

from bench.generate import generate
from bench.phases import Phases
from orchestrator.driver import Driver, RunResult
from orchestrator.output import OutputMerger, write_lines
from orchestrator.progress import Progress
from orchestrator.reader import LineSource
from tasks.apply import apply_events
from tasks.batch import Batch, CommitNotice
from tasks.cartjoin import FLOW_PATH
from tasks.flow import load_flow
from tasks.jobs import batch_events
from tasks.keys import SLOTS, Keys


def read_and_route(path: Path, partitions: int, batch_events: int) -> Driver:
    """The driver's reading of a whole file into per-partition batches (nothing sent)."""
    driver = Driver(
        fakeredis.FakeRedis(),
        Keys("bench"),
        generation=1,
        partitions=partitions,
        slots=SLOTS,
        flow_path=FLOW_PATH,
        on_error="skip",
        out=io.BytesIO(),
        housekeeping=None,  # type: ignore[arg-type]  # (only the reading runs)
        progress=Progress(enabled=False),
        on_commit=lambda *a, **k: None,
        batch_events=batch_events,
        batch_timeout=0.0,
    )
    with path.open("rb") as f:
        source = LineSource(f, 0, 0)
        result = RunResult(committed=-1, next_offset=0)
        while not driver._read_chunk(source, result):  # noqa: SLF001 - the phase timed
            pass
    return driver


def batches_of(driver: Driver, partitions: int, read_through: int) -> list[Batch]:
    """Every buffered batch, in the order the driver would send them (round robin); a
    partition's last batch reaches the last epoch read, as the driver's does."""
    queues = [list(driver.pending.get(p, [])) for p in range(partitions)]
    batches = []
    for i in range(max(map(len, queues))):
        for p, queue in enumerate(queues):
            if i < len(queue):
                pending = queue[i]
                last = queue[i + 1].epochs[0] - 1 if i + 1 < len(queue) else read_through
                batches.append(
                    Batch(
                        "bench",
                        1,
                        p,
                        partitions,
                        pending.epochs[0] - 1,
                        last,
                        FLOW_PATH,
                        "skip",
                        pending.epochs,
                        pending.lines,
                        0.0,
                        SLOTS,
                    )  # fmt: skip
                )
    return batches


def notices_of(batches: list[Batch]) -> list[bytes]:
    """The notice each batch's commit would send: its output lines, made by the flow."""
    flow = load_flow(FLOW_PATH)
    states: dict[str, bytes | None] = {}
    notices = []
    for batch in batches:
        events = batch_events(batch)
        loaded = {key: states.get(key) for _, key, _ in events}
        applied = apply_events(flow, events, loaded, batch.last_epoch, "skip")
        states.update(applied.writes)
        notices.append(
            CommitNotice.encode_outputs(
                batch.partition,
                batch.last_epoch,
                applied.out_epochs,
                applied.out_items,
                applied.rejected,
                applied.failed,
            )  # fmt: skip
        )
    return notices


def merge_and_write(notices: list[CommitNotice], partitions: int, out: io.BufferedWriter) -> int:
    """What the driver does with decoded notices: merge the lines, write the committed ones."""
    merger = OutputMerger()
    applied = [-1] * partitions
    written = 0
    for notice in notices:
        merger.add(notice.partition, notice.epochs, notice.lines)
        applied[notice.partition] = notice.applied_through
        lines = merger.pop_through(min(applied))
        write_lines(out, lines)
        written += len(lines)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.driver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-events", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.events < 1 or args.partitions < 1 or args.batch_events < 1:
        parser.error("--events, --partitions and --batch-events must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        path = Path(tmp) / "events.json"
        with path.open("w") as f:
            for line in generate(args.events, args.users, args.seed):
                f.write(line + "\n")
        phases = Phases(runs=3)
        timed = phases.timed
        driver = timed(
            "read, key and buffer the lines",
            lambda: read_and_route(path, args.partitions, args.batch_events),
        )
        batches = batches_of(driver, args.partitions, args.events - 1)
        timed("frame the batches", lambda: [b.encode() for b in batches])
        encoded = notices_of(batches)
        notices = timed("decode the notices", lambda: [CommitNotice.decode(n) for n in encoded])
        with open(os.devnull, "wb") as devnull:
            written = timed(
                "merge and write the output lines",
                lambda: merge_and_write(notices, args.partitions, devnull),
            )
        assert written == args.events, (written, args.events)  # (one line per cart event)

    print(f"{args.events:,} events, {args.partitions} partitions, {len(batches)} batches")
    phases.print(args.events)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
