"""The rescale benchmark: how long moving a namespace to another partition count takes.

    python -m bench.rescale [--keys 100000] [--epochs 100000] [--partitions 4 16 3 1]
                            [--batch-events N]

Ingests ``--epochs`` events holding ``--keys`` distinct keys (the first ``--keys``
lines are one order of each key, the rest cart events of those keys) with the first
partition count, on the embedded server, keeping the whole replay history
(``--retain-epochs`` = the epochs); then resumes with each next count in turn, which
has nothing left to read and only rescales. It prints, per rescale, the time the
command reported for the move and the command's wall time (process start, server
connection and workers included), and checks that every key still has its state.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.generate import generate
from orchestrator.server import EmbeddedServer, client_for
from tasks.keys import Keys

NAMESPACE = "bench-rescale"
RESCALED = re.compile(r"rescaled namespace .* in ([0-9.]+)s \(([0-9,]+) keys?, ([0-9,]+) undo")


def events(keys: int, epochs: int, seed: int) -> list[str]:
    """One order of each key in a shuffled order, then cart events of those keys."""
    users = [f"k{i}" for i in range(keys)]
    random.Random(seed).shuffle(users)
    first = [
        orjson.dumps({"user_id": u, "type": "order", "order_id": i}).decode()
        for i, u in enumerate(users)
    ]
    rest = [
        line.replace('"user_id": "u', '"user_id": "k')
        for line in generate(max(0, epochs - keys), keys, seed)
    ]
    return (first + rest)[:epochs]


def cli(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--namespace", NAMESPACE],
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"orchestrator {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return took, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rescale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=100_000)
    parser.add_argument(
        "--partitions", type=int, nargs="+", default=[4, 16, 3, 1],
        help="the ingest's count, then the count of each rescale (default 4 16 3 1)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-events", type=int, default=None,
        help="the ingest's --batch-events: smaller batches leave more undo records to move",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if len(args.partitions) < 2 or args.epochs < args.keys:
        parser.error("give at least two partition counts, and --epochs >= --keys")
    with tempfile.TemporaryDirectory(prefix="bench-rescale-") as tmp:
        work = Path(tmp)
        data, source = work / "data", work / "events.json"
        lines = events(args.keys, args.epochs, args.seed)
        source.write_text("".join(f"{line}\n" for line in lines))
        common = ["--data-dir", str(data), "--output", str(work / "out"), "-q"]
        took, _ = cli(
            "ingest", str(source), *common, "--partitions", str(args.partitions[0]),
            "--retain-epochs", str(args.epochs),
            *([] if args.batch_events is None else ["--batch-events", str(args.batch_events)]),
        )  # fmt: skip
        print(
            f"ingest: {args.epochs:,} epochs, {args.keys:,} keys, "
            f"{args.partitions[0]} partitions in {took:.1f}s"
        )
        before = args.partitions[0]
        for after in args.partitions[1:]:
            took, stderr = cli("resume", str(source), *common[:-1], "--partitions", str(after))
            found = RESCALED.search(stderr)
            if found is None:
                sys.exit(f"no rescale reported:\n{stderr}")
            moved, records = found.group(2), found.group(3)
            print(
                f"rescale {before} -> {after} partitions: {moved} keys, {records} undo records "
                f"moved in {float(found.group(1)):.2f}s (command wall {took:.2f}s)"
            )
            before = after
        with EmbeddedServer(data) as url:
            client = client_for(url)
            keys = Keys(NAMESPACE)
            stored = sum(int(client.hlen(keys.state(p))) for p in range(before))
            client.close()
        if stored != args.keys:
            sys.exit(f"{stored:,} states after the rescales, expected {args.keys:,}")
        print(f"states after the rescales: {stored:,} (every key)")


if __name__ == "__main__":
    main()
