"""The latency benchmark: from an event's append to its output line, at a fixed input rate.

    python -m bench.latency [--rate 1000] [--seconds 10] [--source file|stdin|stream] ...
                            [--workers 2] [--partitions 4] [--output-file]

For each source, a producer thread appends cart events at ``--rate`` events a
second, each carrying its send time (field ``sent``, ns since the epoch; the
cart join ignores it), to the input of ``orchestrator ingest ... --follow`` (a
followed file, standard input, or a Redis stream on the embedded server) with
the embedded server and ``--workers`` workers; a reader thread takes the output lines
(stdout, or with ``--output-file`` an output file it follows) as they come and
matches each to its event by epoch. It prints p50/p95/p99/max of
append-to-output per source, and fails unless every event's line came, once.
The pipeline first answers one warm-up event, so start-up is not measured.

A source is one function (``SOURCES``): given the run's directory, it returns
the command's arguments and how to append lines to its input (the embedded
server's data directory is ``DATA`` in it, for a source that writes to Redis).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench.generate import generate
from orchestrator.server import EmbeddedServer, client_for

WARM_UP = 1  # events answered before the timed ones
DRAIN_TIMEOUT = 30.0  # seconds to wait for the last outputs after the producer stopped
DATA = "data"  # the command's --data-dir, in the run's directory


@dataclass
class Source:
    """Where the producer's lines go: the command's input arguments and an appender.

    ``open`` is called with the started command (a source may write to its standard
    input) and returns the function that appends bytes; ``close`` ends the input.
    """

    args: list[str]
    stdin: bool = False  # the command reads a pipe from us
    open: Callable[[subprocess.Popen[bytes]], Callable[[bytes], None]] = lambda _: _no_append
    close: Callable[[], None] = lambda: None


def _no_append(data: bytes) -> None:
    raise NotImplementedError


def file_source(run_dir: Path) -> Source:
    """A file followed like ``tail -F``: each append is one write, flushed."""
    path = run_dir / "events.json"
    f = path.open("ab", buffering=0)

    def append(data: bytes) -> None:
        f.write(data)

    return Source(["ingest", str(path), "--follow"], open=lambda _: append, close=f.close)


def stdin_source(run_dir: Path) -> Source:  # noqa: ARG001 - every source gets the directory
    """Standard input, a pipe the producer writes to."""
    pipe: list[IO[bytes]] = []

    def opened(proc: subprocess.Popen[bytes]) -> Callable[[bytes], None]:
        assert proc.stdin is not None
        pipe.append(proc.stdin)

        def append(data: bytes) -> None:
            proc.stdin.write(data)  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]

        return append

    def close() -> None:
        for p in pipe:
            p.close()

    return Source(["ingest", "-"], stdin=True, open=opened, close=close)


def stream_source(run_dir: Path) -> Source:
    """A Redis stream on the pipeline's (embedded) server, one entry per event, followed.

    The producer attaches to the server first (the command then shares it) and adds each
    chunk of due lines in one pipeline.
    """
    server = EmbeddedServer(run_dir / DATA)
    client = client_for(server.__enter__())

    def append(data: bytes) -> None:
        pipe = client.pipeline(transaction=False)
        for line in data.splitlines():
            pipe.xadd(STREAM_KEY, {"event": line})
        pipe.execute()

    def close() -> None:
        client.close()
        server.__exit__(None, None, None)

    command = ["ingest", f"redis-stream:{STREAM_KEY}", "--follow"]
    return Source(command, open=lambda _: append, close=close)


STREAM_KEY = "events"
SOURCES: dict[str, Callable[[Path], Source]] = {
    "file": file_source,
    "stdin": stdin_source,
    "stream": stream_source,
}


@dataclass
class Received:
    """Output lines as they came: the epoch and when (ns), and anything unexpected."""

    at: dict[int, int] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def add(self, line: bytes, now: int) -> None:
        epoch = int(line.split(b" ", 1)[0])
        with self.arrived:
            if epoch in self.at:
                self.duplicates.append(epoch)
            else:
                self.at[epoch] = now
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` distinct epochs came; whether they did."""
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.at) >= count, timeout)


def read_stream(stream: IO[bytes], received: Received) -> None:
    """Take output lines from a pipe as they come."""
    for line in stream:
        received.add(line, time.time_ns())


def follow_file(path: Path, received: Received, stop: threading.Event) -> None:
    """Take output lines from a file as it grows (polled every millisecond)."""
    while not path.exists() and not stop.is_set():
        time.sleep(0.001)
    with path.open("rb") as f:
        rest = b""
        while True:
            data = f.read()
            now = time.time_ns()
            if data:
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    received.add(line, now)
            elif stop.is_set():
                return
            else:
                time.sleep(0.001)


def events(count: int, users: int) -> Iterator[bytes]:
    """Cart events as JSON objects without their closing brace (the send time goes last)."""
    for line in generate(count, users, seed=1):
        yield line[:-1].encode()


def produce(
    append: Callable[[bytes], None], lines: Iterator[bytes], count: int, rate: float
) -> dict[int, int]:
    """Append ``count`` lines at ``rate`` a second: those due are written together, each
    stamped with the time of the write. Returns each line's send time (ns) by its index."""
    sent: dict[int, int] = {}
    start = time.monotonic()
    i = 0
    while i < count:
        due = min(count, int((time.monotonic() - start) * rate) + 1)
        now = time.time_ns()
        chunk = []
        for j in range(i, due):
            chunk.append(next(lines) + b', "sent": %d}\n' % now)
            sent[j] = now
        append(b"".join(chunk))
        i = due
        # sleep to the next line's due time
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
    return sent


@dataclass
class Figures:
    """One source's latencies (ms)."""

    source: str
    events: int
    p50: float
    p95: float
    p99: float
    max: float
    exit_status: int | None


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def measure(name: str, args: argparse.Namespace, run_dir: Path) -> Figures:
    """Run the pipeline on one source at the fixed rate and measure every event's latency."""
    source = SOURCES[name](run_dir)
    out_path = run_dir / "out.txt"
    command = [sys.executable, "-m", "orchestrator", *source.args, "-q", "--data-dir",
               str(run_dir / DATA), "--workers", str(args.workers),
               "--partitions", str(args.partitions)]  # fmt: skip
    if args.output_file:
        command += ["--output", str(out_path)]
    stderr = (run_dir / "stderr.txt").open("wb")
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE if source.stdin else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if args.output_file else subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,  # our Ctrl-C is not the pipeline's
    )
    received = Received()
    stop = threading.Event()
    if args.output_file:
        target: Callable[[], None] = lambda: follow_file(out_path, received, stop)  # noqa: E731
    else:
        assert proc.stdout is not None
        stdout = proc.stdout
        target = lambda: read_stream(stdout, received)  # noqa: E731
    reader = threading.Thread(target=target, daemon=True)
    reader.start()
    total = WARM_UP + args.rate * args.seconds
    try:
        append = source.open(proc)
        lines = events(total, args.users)
        warm = produce(append, lines, WARM_UP, args.rate)
        if not received.wait_for(WARM_UP, 60.0):
            msg = f"{name}: the pipeline did not answer its warm-up event in 60 s"
            raise SystemExit(msg)
        sent = produce(append, lines, total - WARM_UP, args.rate)
        sent = {WARM_UP + i: t for i, t in sent.items()} | warm
        complete = received.wait_for(total, DRAIN_TIMEOUT)
    finally:
        if source.stdin:
            source.close()  # the input ends: so does the run
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # a followed run ends at an interrupt
        try:
            status: int | None = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = None
        if not source.stdin:
            source.close()
        stop.set()
        reader.join(timeout=10)
        stderr.close()
    missing = sorted(set(range(total)) - set(received.at))
    # a followed file runs until interrupted; standard input ends when we close it
    expected = 0 if source.stdin else 130
    if not complete or missing or received.duplicates or status != expected:
        msg = (f"{name}: {len(missing)} events without output (first {missing[:5]}), "
               f"duplicates {received.duplicates[:5]}, exit status {status}; its stderr:\n"
               + (run_dir / "stderr.txt").read_text(errors="replace"))  # fmt: skip
        raise SystemExit(msg)
    timed = sorted((received.at[e] - sent[e]) / 1e6 for e in range(WARM_UP, total))
    return Figures(
        name, len(timed), percentile(timed, 50), percentile(timed, 95), percentile(timed, 99),
        timed[-1], status,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Measure each source and print one line of percentiles for it."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rate", type=int, default=1000, help="events a second (default 1000)")
    parser.add_argument("--seconds", type=int, default=10, help="how long to produce (10)")
    parser.add_argument("--source", action="append", choices=sorted(SOURCES),
                        help="file (default), stdin or stream; may be given again")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--output-file", action="store_true",
                        help="read the outputs from an --output file, not stdout")  # fmt: skip
    args = parser.parse_args(argv)
    print(f"{args.rate:,} events/s for {args.seconds} s, {args.workers} workers, "
          f"{args.partitions} partitions, outputs from "
          f"{'an --output file' if args.output_file else 'stdout'}; latency from append "
          "to output, ms:", flush=True)  # fmt: skip
    for name in args.source or ["file"]:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
            f = measure(name, args, Path(tmp))
        print(f"{f.source:<6} {f.events:>7,} events matched   p50 {f.p50:6.1f}   "
              f"p95 {f.p95:6.1f}   p99 {f.p99:6.1f}   max {f.max:7.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
