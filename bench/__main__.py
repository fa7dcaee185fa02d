"""The throughput benchmark: the plain loop vs the recoverable pipeline, on one generated file.

    python -m bench [--events 1000000] [--users 100000] [--workers 2] [--partitions 4]

In one invocation and on the same file it times (1) the seed's code as a plain
single-process loop (``bench/plain.py``), (2) ``orchestrator ingest`` with the
embedded server and N workers, and (3) ``orchestrator resume`` of a run that
stopped with 1% of the input left; it checks that (1) and (2) wrote identical
bytes, and prints one table: events/s, the ratio (2)/(1), resume time as a share
of the full run, peak RSS of every process, Redis ``used_memory`` at the end and
the JSON size of all final states. The figures are measurements, not a test.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.generate import generate
from bench.procs import TreeSampler, run_sampled
from orchestrator.server import EmbeddedServer, client_for
from tasks.keys import Keys

MB = 1 << 20


def orchestrator(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


@dataclass
class RedisFigures:
    """What a finished run leaves in Redis."""

    used_memory: int
    state_json_bytes: int  # the JSON of every key's final state
    state_keys: int
    state_memory: int  # Redis's memory for the state hashes (MEMORY USAGE)
    history_memory: int  # ... and for the undo records of the retained epochs


def redis_figures(data_dir: Path, namespace: str) -> RedisFigures:
    """Memory and state sizes of a finished run."""
    with EmbeddedServer(data_dir) as url:
        client = client_for(url)
        used = int(client.info("memory")["used_memory"])
        keys = Keys(namespace)
        partitions = int(client.hget(keys.meta, "partitions"))
        state_bytes = count = state_memory = history_memory = 0
        for p in range(partitions):
            for _, value in client.hscan_iter(keys.state(p), count=5000):
                state_bytes += len(value)
                count += 1
            state_memory += client.memory_usage(keys.state(p), samples=0) or 0
            history_memory += client.memory_usage(keys.undo(p), samples=0) or 0
        client.close()
    return RedisFigures(used, state_bytes, count, state_memory, history_memory)


def rss_summary(sampler: TreeSampler) -> str:
    parts = []
    for role, procs in sorted(sampler.by_role().items()):
        peaks = sorted((p.peak_rss for p in procs), reverse=True)
        shown = "/".join(f"{x // MB}" for x in peaks[:4])
        parts.append(f"{role} {shown}")
    return ", ".join(parts) + " MB"


def cpu_summary(sampler: TreeSampler) -> str:
    """CPU seconds (user + system) of each role, summed over its processes."""
    parts = []
    for role, procs in sorted(sampler.by_role().items()):
        parts.append(f"{role} {sum(p.cpu_seconds for p in procs):.1f}")
    return ", ".join(parts) + " s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    try:
        events = work / "events.json"
        with open(events, "w", encoding="utf-8") as f:
            for line in generate(args.events, args.users, args.seed):
                f.write(line + "\n")
        print(
            f"{args.events:,} events, {args.users:,} users, {args.workers} workers, "
            f"{args.partitions} partitions; input {events.stat().st_size / MB:.1f} MB",
            flush=True,
        )

        # Each timed run starts with no dirty pages left to write back: the embedded
        # server fsyncs every commit, and an fsync also waits for other files' writeback.
        os.sync()
        # (1) the plain loop
        with open(work / "plain.out", "wb") as out:
            plain_wall, plain_tree, code = run_sampled(
                [sys.executable, "-m", "bench.plain", str(events)], stdout=out
            )
        assert code == 0, "the plain loop failed"

        # (2) the pipeline: ingest with the embedded server
        os.sync()
        run = ["--workers", str(args.workers), "--partitions", str(args.partitions), "-q"]
        data = work / "data"
        pipe_wall, pipe_tree, code = run_sampled(orchestrator(
            "ingest", str(events), "--data-dir", str(data), "--output", str(work / "pipe.out"), *run
        ))  # fmt: skip
        assert code == 0, "orchestrator ingest failed"
        identical = filecmp.cmp(work / "plain.out", work / "pipe.out", shallow=False)
        figures = redis_figures(data, "cart-join")

        # (3) resume with 1% of the input left: a run over 99% of it, then the rest appended
        partial = work / "partial.json"
        lines = events.read_bytes().splitlines(keepends=True)
        cut = len(lines) * 99 // 100
        partial.write_bytes(b"".join(lines[:cut]))
        data99 = work / "data99"
        _, _, code = run_sampled(orchestrator(
            "ingest", str(partial), "--data-dir", str(data99), "--output", str(work / "r.out"), *run
        ))  # fmt: skip
        assert code == 0, "the 99% ingest failed"
        with open(partial, "ab") as f:
            f.write(b"".join(lines[cut:]))
        os.sync()
        resume_wall, resume_tree, code = run_sampled(orchestrator(
            "resume", str(partial), "--data-dir", str(data99), "--output", str(work / "r.out"), *run
        ))  # fmt: skip
        assert code == 0, "resume failed"
        resumed_identical = filecmp.cmp(work / "plain.out", work / "r.out", shallow=False)

        n = args.events
        print()
        print(f"{'run':<34}{'wall s':>9}{'events/s':>12}   peak RSS")
        print(
            f"{'(1) plain loop (json module)':<34}{plain_wall:>9.2f}{n / plain_wall:>12,.0f}   "
            f"{rss_summary(plain_tree)}"
        )
        print(
            f"{'(2) orchestrator ingest':<34}{pipe_wall:>9.2f}{n / pipe_wall:>12,.0f}   "
            f"{rss_summary(pipe_tree)}"
        )
        resumed_rate = (n - cut) / resume_wall
        print(
            f"{'(3) resume, last 1% left':<34}{resume_wall:>9.2f}{resumed_rate:>12,.0f}   "
            f"{rss_summary(resume_tree)}"
        )
        print()
        print(f"CPU (2): {cpu_summary(pipe_tree)}; (1): {cpu_summary(plain_tree)}")
        print(f"ratio (2)/(1), events/s:         {plain_wall / pipe_wall:.2f}")
        print(f"resume / full run, wall:         {resume_wall / pipe_wall:.1%}")
        print(f"output (1) == (2), byte for byte: {identical}")
        print(f"output after resume == (1):       {resumed_identical}")
        print(
            f"Redis used_memory at the end:    {figures.used_memory / MB:.1f} MB "
            f"(state hashes {figures.state_memory / MB:.1f}, "
            f"replay history {figures.history_memory / MB:.1f})"
        )
        print(
            f"final states, JSON:              {figures.state_json_bytes / MB:.1f} MB "
            f"in {figures.state_keys:,} keys"
        )
        return 0 if identical and resumed_identical else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
