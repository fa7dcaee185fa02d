"""The throughput benchmark: the plain loop vs the recoverable pipeline, on one generated file.

    python -m bench [--events 1000000] [--users 100000] [--workers 2] [--partitions 4]
                    [--repeat 3] [--growth-to EVENTS] [--hot-key-orders N]
                    [--metrics-port PORT]

In one invocation and on the same file it times (1) the seed's code as a plain
single-process loop (``bench/plain.py``), (2) ``orchestrator ingest`` with the
embedded server and N workers, and (3) ``orchestrator resume`` of a run that
stopped with 1% of the input left; it checks that (1), (2) and (3) wrote
identical bytes, and prints one table: events/s, the ratio (2)/(1), resume time
as a share of the full run, peak RSS of every process, Redis ``used_memory`` at
the end and the JSON size of all final states. The figures are measurements,
not a test.

The project's modules are byte-compiled first, as ``pip install`` does. Both
sides then run once, untimed, on the first 1% of the file (page cache warm, as
for every run but the first after a boot). Then (1) and (2) run
``--repeat`` times, alternating, and (3) as often, each from a fresh copy of
the 99% run's data; the table shows the median run with the range, and the
ratio of each pair: on a shared machine single runs drift (docs/performance.md).
With ``--growth-to`` it also ingests that many events of the same users and
prints how Redis memory grew, beside the growth of the states' JSON. With
``--metrics-port`` every repeat also times (2m), the ingest serving metrics
there (its workers on the next ports), scraped every second as a busy
Prometheus would, next to (2) (which goes first alternates): the cost of
metrics is the ratio of (2m) to (2) in each pair.
"""

from __future__ import annotations

import argparse
import compileall
import filecmp
import importlib
import itertools
import os
import shutil
import sys
import tempfile
import threading
import urllib.request
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


def cpu_summary(sampler: TreeSampler) -> str:
    """CPU seconds (user + system) of each role, summed over its processes."""
    parts = []
    for role, procs in sorted(sampler.by_role().items()):
        parts.append(f"{role} {sum(p.cpu_seconds for p in procs):.1f}")
    return ", ".join(parts) + " s"


def cpu_per_event(sampler: TreeSampler, events: int) -> str:
    """CPU µs per event of each role, and for the driver and Redis the events/s that one of
    them could carry at that cost with unlimited workers (workers scale out; they do not)."""
    parts = []
    for role, procs in sorted(sampler.by_role().items()):
        micros = sum(p.cpu_seconds for p in procs) / events * 1e6
        ceiling = ""
        if role in ("driver", "redis"):  # (a run too short for one clock tick shows none)
            ceiling = f" (ceiling {1e6 / micros:,.0f}/s)" if micros else " (ceiling unmeasured)"
        parts.append(f"{role} {micros:.2f} µs{ceiling}")
    return ", ".join(parts)


@dataclass
class Timed:
    """One timed run of a command: its wall time and its sampled process tree."""

    wall: float
    tree: TreeSampler


def timed(args: list[str], what: str, **kwargs: object) -> Timed:
    """Run a command to its end, with no dirty pages left to write back; it must succeed."""
    # Each timed run starts with no dirty pages left to write back: the embedded
    # server fsyncs every commit, and an fsync also waits for other files' writeback.
    os.sync()
    wall, tree, code = run_sampled(args, **kwargs)
    assert code == 0, f"{what} failed (exit status {code})"
    return Timed(wall, tree)


def median(runs: list[Timed]) -> Timed:
    """The run with the median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda t: t.wall)[(len(runs) - 1) // 2]


def walls(runs: list[Timed]) -> str:
    """The median wall time, and the range when there were several runs."""
    middle = f"{median(runs).wall:.2f}"
    if len(runs) == 1:
        return middle
    return f"{middle} ({min(t.wall for t in runs):.2f}-{max(t.wall for t in runs):.2f})"


def peak_rss_summary(runs: list[Timed]) -> str:
    """Peak RSS of each process role over all runs (MB): the i-th largest of each role."""
    peaks: dict[str, list[int]] = {}
    for run in runs:
        for role, procs in run.tree.by_role().items():
            mine = sorted((p.peak_rss for p in procs), reverse=True)
            both = itertools.zip_longest(peaks.get(role, []), mine, fillvalue=0)
            peaks[role] = [max(pair) for pair in both]
    parts = [f"{role} {'/'.join(f'{x // MB}' for x in peaks[role][:4])}" for role in sorted(peaks)]
    return ", ".join(parts) + " MB"


def write_events(path: Path, events: int, users: int, seed: int, hot_key_orders: int = 0) -> None:
    """Write ``events`` generated cart events, a JSON line each."""
    with open(path, "w", encoding="utf-8") as f:
        for line in generate(events, users, seed, hot_key_orders=hot_key_orders):
            f.write(line + "\n")


def copy_lines(source: Path, target: Path, start: int, stop: int | None, mode: str = "wb") -> None:
    """Write lines ``start`` to ``stop`` of ``source`` (None: to its end) to ``target``."""
    with open(source, "rb") as src, open(target, mode) as dst:
        dst.writelines(itertools.islice(src, start, stop))


def byte_compile_project() -> None:
    """Write the bytecode of the project's modules, as ``pip install`` does.

    An editable install compiles them at first import, unless the environment
    says not to (``PYTHONDONTWRITEBYTECODE``, set on this project's machines):
    then every command compiles them again at start, a share of a short resume.
    """
    for name in ("orchestrator", "tasks", "bench"):
        package = importlib.import_module(name)
        compileall.compile_dir(Path(package.__file__ or "").parent, quiet=1)


def print_growth(
    work: Path, args: argparse.Namespace, run: list[str], before: RedisFigures
) -> None:
    """Ingest ``--growth-to`` events of the same users; print how Redis memory grew."""
    more = work / "more.json"
    write_events(more, args.growth_to, args.users, args.seed)
    data = work / "data-more"
    timed(orchestrator(
        "ingest", str(more), "--data-dir", str(data), "--output", str(work / "more.out"), *run
    ), "orchestrator ingest")  # fmt: skip
    after = redis_figures(data, "cart-join")

    def grew(field: str) -> str:
        return f"{(getattr(after, field) - getattr(before, field)) / MB:+.1f} MB"

    print()
    print(f"from {args.events:,} to {args.growth_to:,} events of the same users:")
    print(
        f"  Redis used_memory               {grew('used_memory')} "
        f"(state hashes {grew('state_memory')}, replay history {grew('history_memory')})"
    )
    print(f"  final states, JSON              {grew('state_json_bytes')}")


class Scraper:
    """Scrapes the metrics of the driver and its workers every second (while it runs)."""

    def __init__(self, port: int, workers: int) -> None:
        self.ports = [port + i for i in range(1 + workers)]
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    pass  # (between runs nothing serves)


def sides(repeat: int, metrics: bool) -> list[bool]:
    """Whether each ingest of a repeat serves metrics: (2), or (2) and (2m) in turns first."""
    if not metrics:
        return [False]
    return [False, True] if repeat % 2 == 0 else [True, False]


def print_metrics_cost(plain: list[Timed], off: list[Timed], on: list[Timed]) -> None:
    """(2m) beside (2), if timed: its wall time, its ratio to (1), and on/off of each pair."""
    if not on:
        return
    n_on = median(on)
    print(f"(2m) ingest, --metrics-port:     {walls(on)} s, CPU {cpu_summary(n_on.tree)}")
    print(f"ratio (2m)/(1), events/s:        {median(plain).wall / n_on.wall:.2f}")
    pairs = [b.wall / a.wall for a, b in zip(off, on, strict=True)]
    shown = ", ".join(f"{x:.3f}" for x in pairs)
    middle = sorted(pairs)[(len(pairs) - 1) // 2]
    print(f"wall (2m)/(2), each pair:        {shown} (median {middle:.3f})")
    # CPU seconds of every process of the run: less moved by other jobs than wall time
    cpu = [total_cpu(b) / total_cpu(a) for a, b in zip(off, on, strict=True)]
    shown = ", ".join(f"{x:.3f}" for x in cpu)
    middle = sorted(cpu)[(len(cpu) - 1) // 2]
    print(f"CPU (2m)/(2), each pair:         {shown} (median {middle:.3f})")


def total_cpu(run: Timed) -> float:
    """CPU seconds of every process of a run."""
    return sum(p.cpu_seconds for procs in run.tree.by_role().values() for p in procs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="events to generate (default 1,000,000)"
    )
    parser.add_argument(
        "--users", type=int, default=100_000, help="users they come from (default 100,000)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes of the ingest (default 2)"
    )
    parser.add_argument(
        "--partitions", type=int, default=4, help="partitions of the namespace (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")
    parser.add_argument(
        "--hot-key-orders",
        type=int,
        default=0,
        metavar="N",
        help="make N of the events orders of one user (a hot key; python -m bench.generate)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="time each of (1), (2), (3) this many times, (1) and (2) alternating, "
        "and report the median run (default 3)",
    )
    parser.add_argument(
        "--growth-to",
        type=int,
        metavar="EVENTS",
        help="also ingest this many events of the same users (untimed) and print how Redis "
        "memory grew from --events to it, beside the growth of the states' JSON",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="the runs serve Prometheus metrics on PORT (workers on the next ports), "
        "scraped every second",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0 <= args.hot_key_orders <= args.events:
        parser.error("--hot-key-orders must be between 0 and --events")
    if args.growth_to is not None and args.growth_to <= args.events:
        parser.error("--growth-to must be more than --events")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.metrics_port is None:
        return run_bench(args)
    with Scraper(args.metrics_port, args.workers) as scraper:
        status = run_bench(args)
    print(f"metrics served on {args.metrics_port} and scraped {scraper.scrapes} times")
    return status


def run_bench(args: argparse.Namespace) -> int:
    """Generate the input, time the runs, print the table; 0 if every output matched."""
    work = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    try:
        events = work / "events.json"
        write_events(events, args.events, args.users, args.seed, args.hot_key_orders)
        hot = f" + {args.hot_key_orders:,} orders of one user" if args.hot_key_orders else ""
        print(
            f"{args.events:,} events, {args.users:,} users{hot}, {args.workers} workers, "
            f"{args.partitions} partitions; input {events.stat().st_size / MB:.1f} MB; "
            f"median of {args.repeat} run(s) each",
            flush=True,
        )
        run = ["--workers", str(args.workers), "--partitions", str(args.partitions), "-q"]
        serving = [] if args.metrics_port is None else ["--metrics-port", str(args.metrics_port)]

        def plain(source: Path, out: Path) -> Timed:
            with open(out, "wb") as f:
                return timed([sys.executable, "-m", "bench.plain", str(source)], "the plain loop",
                             stdout=f)  # fmt: skip

        def ingest(source: Path, data: Path, out: Path, *more: str) -> Timed:
            return timed(orchestrator(
                "ingest", str(source), "--data-dir", str(data), "--output", str(out), *run, *more
            ), "orchestrator ingest")  # fmt: skip

        byte_compile_project()
        # Untimed warm-up of both sides on the first 1% (at most 20,000 lines): the
        # timed runs then start with the interpreter, redis-server and the modules
        # in the page cache, as every run but the first after a boot does.
        warm = work / "warm.json"
        copy_lines(events, warm, 0, min(20_000, max(1, args.events // 100)))
        plain(warm, work / "warm-plain.out")
        ingest(warm, work / "warm-data", work / "warm-pipe.out")
        shutil.rmtree(work / "warm-data")

        # (1) the plain loop and (2) the pipeline, alternating (and (2m) beside (2))
        plain_runs: list[Timed] = []
        pipe_runs: list[Timed] = []
        metrics_runs: list[Timed] = []
        identical = True
        for i in range(args.repeat):
            plain_runs.append(plain(events, work / f"plain{i}.out"))
            if i:
                identical &= filecmp.cmp(work / "plain0.out", work / f"plain{i}.out", shallow=False)
                os.remove(work / f"plain{i}.out")
            for on in sides(i, bool(serving)):
                data = work / f"data{i}{'m' if on else ''}"
                timed_run = ingest(events, data, work / f"pipe{i}.out", *(serving if on else []))
                (metrics_runs if on else pipe_runs).append(timed_run)
                identical &= filecmp.cmp(work / "plain0.out", work / f"pipe{i}.out", shallow=False)
                os.remove(work / f"pipe{i}.out")
                if on or i < args.repeat - 1:
                    shutil.rmtree(data)
        figures = redis_figures(work / f"data{args.repeat - 1}", "cart-join")

        # (3) resume with 1% of the input left: a run over 99% of it, then the rest
        # appended; each timed resume starts from a fresh copy of what that run left
        # (its data directory and its output file, under their own names).
        partial = work / "partial.json"
        cut = args.events * 99 // 100
        copy_lines(events, partial, 0, cut)
        data99, out99 = work / "data99", work / "r.out"
        ingest(partial, data99, out99)
        copy_lines(events, partial, cut, None, mode="ab")
        shutil.copytree(data99, work / "data99.saved")
        shutil.copyfile(out99, work / "r.out.saved")
        resume_runs: list[Timed] = []
        resumed_identical = True
        for i in range(args.repeat):
            if i:
                shutil.rmtree(data99)
                shutil.copytree(work / "data99.saved", data99)
                shutil.copyfile(work / "r.out.saved", out99)
            resume_runs.append(timed(orchestrator(
                "resume", str(partial), "--data-dir", str(data99), "--output", str(out99), *run
            ), "resume"))  # fmt: skip
            resumed_identical &= filecmp.cmp(work / "plain0.out", out99, shallow=False)

        n = args.events
        plain_run, pipe_run, resume_run = median(plain_runs), median(pipe_runs), median(resume_runs)
        print()
        print(f"{'run':<30}{'wall s':>19}{'events/s':>10}   peak RSS")
        for name, runs, count in (
            ("(1) plain loop (json module)", plain_runs, n),
            ("(2) orchestrator ingest", pipe_runs, n),
            ("(3) resume, last 1% left", resume_runs, n - cut),
        ):
            print(
                f"{name:<30}{walls(runs):>19}{count / median(runs).wall:>10,.0f}   "
                f"{peak_rss_summary(runs)}"
            )
        print()
        print(
            f"CPU of the median runs: (2) {cpu_summary(pipe_run.tree)}; "
            f"(1) {cpu_summary(plain_run.tree)}"
        )
        print(f"CPU per event of (2): {cpu_per_event(pipe_run.tree, n)}")
        print(f"ratio (2)/(1), events/s:         {plain_run.wall / pipe_run.wall:.2f}")
        if args.repeat > 1:
            pairs = [f"{a.wall / b.wall:.2f}" for a, b in zip(plain_runs, pipe_runs, strict=True)]
            print(f"  ... of each pair of runs:      {', '.join(pairs)}")
        print_metrics_cost(plain_runs, pipe_runs, metrics_runs)
        print(f"resume / full run, wall:         {resume_run.wall / pipe_run.wall:.1%}")
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
        if args.growth_to is not None:
            print_growth(work, args, run, figures)
        return 0 if identical and resumed_identical else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
