"""Chaos run: the CLI on real Redis while workers and the driver are killed with SIGKILL.

It generates cart events, runs ``orchestrator ingest`` with external
``orchestrator worker`` processes, SIGKILLs a busy worker at random moments
(and starts a new one), SIGKILLs the driver at set points and runs
``orchestrator resume`` after each, then checks that the output lines
(deduplicated by epoch across the runs) and the final state of every key equal
a clean single-process run of the seed's code (``bench/plain.py``). Seeded;
prints its seed and a summary; exits 1 on any mismatch. For example::

    python -m bench.chaos --events 500000 --users 50000 --worker-kills 50 --driver-kills 5
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import redis
from rq import Worker

from bench.generate import generate
from bench.plain import run_plain
from orchestrator.embedded import redis_server_binary
from tasks.keys import Keys


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server with an append-only file (appendfsync always)."""
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", sock, "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", directory,
         "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{sock}"
    client = redis.Redis.from_url(url)
    for _ in range(750):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.02)
    raise SystemExit("the chaos run's redis-server did not start")


class Chaos:
    """Workers that get killed, drivers that get killed, and the bookkeeping of both."""

    def __init__(self, args: argparse.Namespace, url: str, workdir: Path) -> None:
        self.args, self.url, self.workdir = args, url, workdir
        self.rng = random.Random(args.seed)
        self.namespace = f"chaos-{args.seed}"
        self.keys = Keys(self.namespace)
        self.client = redis.Redis.from_url(url)
        self.env = {**os.environ, "REDIS_URL": url}
        self.env.pop("RQ_REDIS_URL", None)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_kills = 0
        self.driver_kills = 0
        self.driver_runs = 0
        self.done = threading.Event()
        self.log = open(workdir / "processes.log", "wb")  # noqa: SIM115

    def cli(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args, "--namespace", self.namespace],
            env=self.env, stdin=subprocess.DEVNULL, **kwargs,  # type: ignore[call-overload]
        )  # fmt: skip

    def start_worker(self) -> None:
        self.workers.append(self.cli("worker", stdout=self.log, stderr=self.log))

    def kill_workers(self) -> None:
        """Now and then, SIGKILL a worker in the middle of a batch (and start a new one)."""
        while self.worker_kills < self.args.worker_kills:
            if self.done.wait(self.rng.uniform(0.05, 0.3)):
                return
            victim = None
            while victim is None:  # a kill between batches proves little: wait for a busy one
                if self.done.wait(0.005):
                    return
                alive = {w.pid: w for w in self.workers if w.poll() is None}
                busy = [
                    w.pid for w in Worker.all(connection=self.client)
                    if w.pid in alive and w.get_current_job_id()
                ]  # fmt: skip
                victim = alive[self.rng.choice(busy)] if busy else None
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            self.workers.remove(victim)
            self.worker_kills += 1
            self.start_worker()

    def committed(self) -> int:
        try:
            return int(self.client.hget(self.keys.meta, "committed") or -1)
        except redis.RedisError:
            return -1

    def applied(self) -> int:
        """How far every partition has applied: it moves with each batch's commit, while the
        committed epoch is recorded about once a second (a fast run records it few times)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for p in range(self.args.partitions):
                pipe.hget(self.keys.progress(p), "applied")
            return min(int(a or -1) for a in pipe.execute())
        except redis.RedisError:
            return -1

    def run_driver(self, command: str, path: Path, kill: bool) -> tuple[int, str]:
        """Run the driver to its end, or (``kill``) SIGKILL it once its committed epoch has
        passed a random point of what it has left (a time would not do: on a fast machine
        a short resume ends before it)."""
        out_path = self.workdir / f"driver-{self.driver_runs}.out"
        self.driver_runs += 1
        with open(out_path, "wb") as out:
            args = [command, str(path), "--workers", "0", "--quiet"]
            args += ["--batch-events", str(self.args.batch_events)]
            if command == "ingest":
                args += ["--partitions", str(self.args.partitions)]
            start = self.committed()
            target = start + max(1, int(self.rng.uniform(0.1, 0.6) * (self.args.events - start)))
            driver = self.cli(*args, stdout=out, stderr=self.log)
            while driver.poll() is None:
                if kill and self.applied() >= target:
                    driver.send_signal(signal.SIGKILL)
                    # (it may have ended just before: only a kill that landed counts)
                    if driver.wait() == -signal.SIGKILL:
                        self.driver_kills += 1
                    break
                time.sleep(0.002)
        return driver.returncode, out_path.read_text()

    def run(self, path: Path) -> list[str]:
        for _ in range(self.args.workers):
            self.start_worker()
        killer = threading.Thread(target=self.kill_workers, daemon=True)
        killer.start()
        outputs = []
        command = "ingest"
        try:
            while True:
                kill = self.driver_kills < self.args.driver_kills
                code, text = self.run_driver(command, path, kill)
                outputs.append(text)
                if code == 0:
                    break
                if code != -signal.SIGKILL:
                    raise SystemExit(f"a driver run exited with status {code}: see {self.log.name}")
                command = "resume"
        finally:
            self.done.set()
            killer.join()
            for w in self.workers:
                w.send_signal(signal.SIGKILL)
                w.wait()
        return outputs

    def states(self) -> dict[str, object]:
        partitions = int(self.client.hget(self.keys.meta, "partitions"))
        states: dict[str, object] = {}
        for p in range(partitions):
            for key, value in self.client.hgetall(self.keys.state(p)).items():
                states[key.decode()] = orjson.loads(value)
        return states


def merge(outputs: list[str]) -> tuple[dict[int, str], int]:
    """Lines by epoch across runs, and how many epochs were printed differently twice."""
    by_epoch: dict[int, str] = {}
    conflicts = 0
    for text in outputs:
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # cut by a SIGKILL mid-write; the resumed run prints it again
            epoch = int(line.split(" ", 1)[0])
            if by_epoch.setdefault(epoch, line) != line:
                conflicts += 1
    return by_epoch, conflicts


def verify(lines: list[str], outputs: list[str], states: dict[str, object]) -> dict[str, int]:
    """Compare the runs' output and final states with the plain loop's."""
    expected = io.StringIO()
    expected_states = run_plain(lines, expected)
    expected_lines = expected.getvalue().splitlines(keepends=True)
    by_epoch, conflicts = merge(outputs)
    wrong_lines = sum(1 for e, line in enumerate(expected_lines) if by_epoch.get(e) != line)
    extra_lines = len(set(by_epoch) - set(range(len(expected_lines))))
    every_key = expected_states.keys() | states.keys()
    wrong_keys = sum(1 for k in every_key if states.get(k) != expected_states.get(k))
    printed = sum(len(o.splitlines()) for o in outputs)
    return {
        "printed": printed,
        "reprinted": printed - len(by_epoch),
        "wrong_lines": wrong_lines + extra_lines + conflicts,
        "wrong_keys": wrong_keys,
        "keys": len(expected_states),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--worker-kills", type=int, default=10)
    parser.add_argument("--driver-kills", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--batch-events", type=int, default=500, help="small batches: more of them to hit"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--redis-url", help="default: a private redis-server with AOF always")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chaos run; 0 when everything matches and every planned kill happened."""
    args = parse_args(argv)
    print(f"chaos seed: {args.seed}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-chaos-"))
    server, url = (None, args.redis_url) if args.redis_url else start_redis(str(workdir))
    started = time.monotonic()
    ok = False
    try:
        lines = list(generate(args.events, args.users, seed=args.seed))
        path = workdir / "events.json"
        path.write_text("\n".join(lines) + "\n")
        chaos = Chaos(args, url, workdir)
        report = verify(lines, chaos.run(path), chaos.states())
        mismatches = report["wrong_lines"] + report["wrong_keys"]
        print(f"events:                 {args.events:,} ({args.users:,} users)")
        print(f"workers / partitions:   {args.workers} / {args.partitions}")
        print(f"worker SIGKILLs:        {chaos.worker_kills}")
        print(f"driver SIGKILLs:        {chaos.driver_kills} ({chaos.driver_runs} driver runs)")
        print(f"lines printed:          {report['printed']:,} ({report['reprinted']:,} again)")
        print(f"wrong or missing lines: {report['wrong_lines']}")
        print(f"wrong or missing keys:  {report['wrong_keys']} of {report['keys']:,}")
        print(f"mismatches:             {mismatches}")
        print(f"wall time:              {time.monotonic() - started:.1f} s")
        if chaos.worker_kills < args.worker_kills or chaos.driver_kills < args.driver_kills:
            print("the run ended before every planned kill happened")
            return 1
        if mismatches:
            print(f"logs kept in {workdir}")
            return 1
        ok = True
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
