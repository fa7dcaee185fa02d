"""Chaos run: the CLI on real Redis while workers and the driver are killed, paused and
woken, and Redis loses the tail of what it acknowledged.

It generates cart events, runs ``orchestrator ingest`` with external
``orchestrator worker`` processes, and meanwhile:

- SIGKILLs a busy worker at random moments (and starts a new one);
- SIGSTOPs a busy worker for up to 6 s (past its lease: its batch runs again
  elsewhere) and SIGCONTs it (``--worker-pauses``);
- SIGKILLs the driver at set points and runs ``orchestrator resume`` after each;
- SIGSTOPs the driver past its lock, runs a ``resume`` that takes the namespace
  over, and SIGCONTs the old driver while the new one runs: the old one must
  stop with exit 75 (``--driver-pauses``);
- SIGKILLs the redis-server, cuts off part of what its append-only file gained
  since the driver started (writes it had acknowledged) and starts it again:
  the driver must stop with exit 3 (Redis lost data) or finish exactly, and a
  ``resume`` continues (``--redis-cuts``; the private server only).

Then it checks that the output lines (deduplicated by epoch across the runs;
an epoch printed twice must be printed alike) and the final state of every key
equal a clean single-process run of the seed's code (``bench/plain.py``). Any
other exit status of a driver is a failure. Seeded; prints its seed and a
summary; exits 1 on any mismatch. For example::

    python -m bench.chaos --events 500000 --users 50000 --worker-kills 50 --driver-kills 5
    python -m bench.chaos --worker-pauses 10 --driver-pauses 3 --redis-cuts 3
"""

from __future__ import annotations

import argparse
import collections
import glob
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


class PrivateRedis:
    """A redis-server of the run's own with an append-only file (appendfsync always): it
    can be killed, lose the tail of its file, and start again."""

    def __init__(self, directory: str, binary: str | None = None) -> None:
        self.directory, self.binary = directory, binary or redis_server_binary()
        self.socket = os.path.join(directory, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", self.socket, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.directory,
             "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(1500):
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.02)
        finally:
            client.close()
        raise SystemExit("the chaos run's redis-server did not start")

    def aof(self) -> str:
        """The file Redis appends to now (Redis 7: the last incremental part)."""
        parts = sorted(glob.glob(os.path.join(self.directory, "appendonlydir", "*.incr.aof")))
        return parts[-1] if parts else os.path.join(self.directory, "appendonly.aof")

    def lose_tail(self, since: int, share: float) -> int:
        """SIGKILL the server, cut ``share`` of what its file gained after byte ``since`` and
        start it again: the writes it had acknowledged last are gone. Returns the bytes cut."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        aof = self.aof()
        size = os.path.getsize(aof)
        cut = int(max(0, size - since) * share)
        os.truncate(aof, size - cut)
        self.start()
        return cut

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


# Seconds a paused driver's lock lives (the drivers of a run with --driver-pauses): a
# resume takes the namespace over that long after the pause.
PAUSED_DRIVER_LOCK_TTL = "2"

# What each fault of a driver run may end in, besides the exit of a run that finished (0).
EXPECTED_EXITS = {
    "kill": {-signal.SIGKILL},
    "cut": {3},  # Redis lost data: the driver stops, and a resume continues
    "pause": {75},  # the woken driver: another took over, it wrote nothing more
}


class Chaos:
    """Workers and drivers that get killed or paused, a Redis that loses writes, and the
    bookkeeping of them all."""

    def __init__(
        self, args: argparse.Namespace, url: str, workdir: Path, server: PrivateRedis | None
    ) -> None:
        self.args, self.url, self.workdir, self.server = args, url, workdir, server
        self.rng = random.Random(args.seed)
        self.namespace = f"chaos-{args.seed}"
        self.keys = Keys(self.namespace)
        self.client = redis.Redis.from_url(url)
        self.env = {**os.environ, "REDIS_URL": url}
        self.env.pop("RQ_REDIS_URL", None)
        if args.driver_pauses:
            self.env["ORCHESTRATOR_DRIVER_LOCK_TTL"] = PAUSED_DRIVER_LOCK_TTL
        self.workers: list[subprocess.Popen[bytes]] = []
        self.done = threading.Event()
        self.log = open(workdir / "processes.log", "wb")  # noqa: SIM115
        self.count: collections.Counter[str] = collections.Counter()
        self.worker_exits: collections.Counter[int] = collections.Counter()
        self.driver_exits: collections.Counter[int] = collections.Counter()
        self.driver_runs = 0
        # the driver runs' faults, in a random order, the cuts last (a run may finish exactly
        # after a cut, leaving the faults after it undone): each run pops the next one
        self.plan = ["kill"] * args.driver_kills + ["pause"] * args.driver_pauses
        self.rng.shuffle(self.plan)
        self.plan[:0] = ["cut"] * args.redis_cuts

    def cli(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args, "--namespace", self.namespace],
            env=self.env, stdin=subprocess.DEVNULL, **kwargs,  # type: ignore[call-overload]
        )  # fmt: skip

    def start_worker(self) -> None:
        self.workers.append(self.cli("worker", stdout=self.log, stderr=self.log))

    # ------------------------------------------------------------------ workers

    def fault_workers(self) -> None:
        """Now and then, SIGKILL or pause a worker in the middle of a batch (a killed one is
        replaced); a worker that exits by itself is counted and replaced too."""
        faults = ["kill"] * self.args.worker_kills + ["pause"] * self.args.worker_pauses
        self.rng.shuffle(faults)
        for fault in faults:
            if self.done.wait(self.rng.uniform(0.05, 0.3)):
                return
            victim = self.busy_worker()
            if victim is None:
                return
            if fault == "kill":
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                self.workers.remove(victim)
                self.count["worker SIGKILLs"] += 1
                self.start_worker()
            else:
                victim.send_signal(signal.SIGSTOP)
                self.count["worker pauses"] += 1
                # past its lease (3 s) and the driver's wait for a lost batch (2 s), or not
                self.done.wait(self.rng.uniform(0.2, 6.0))
                victim.send_signal(signal.SIGCONT)

    def busy_worker(self) -> subprocess.Popen[bytes] | None:
        """A worker running a job (a fault between batches proves little); None once done."""
        while not self.done.wait(0.005):
            self.replace_exited_workers()
            alive = {w.pid: w for w in self.workers if w.poll() is None}
            try:
                busy = [
                    w.pid for w in Worker.all(connection=self.client)
                    if w.pid in alive and w.get_current_job_id()
                ]  # fmt: skip
            except redis.RedisError:  # (Redis restarting after a cut)
                continue
            if busy:
                return alive[self.rng.choice(busy)]
        return None

    def replace_exited_workers(self) -> None:
        for w in [w for w in self.workers if w.poll() is not None]:
            self.worker_exits[w.returncode] += 1
            self.workers.remove(w)
            self.start_worker()

    # ------------------------------------------------------------------ drivers

    def committed(self) -> int:
        try:
            return int(self.client.hget(self.keys.meta, "committed") or -1)
        except redis.RedisError:
            return -1

    def generation(self) -> int:
        try:
            return int(self.client.hget(self.keys.meta, "generation") or -1)
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

    def start_driver(self, command: str, path: Path) -> tuple[subprocess.Popen[bytes], Path]:
        out_path = self.workdir / f"driver-{self.driver_runs}.out"
        self.driver_runs += 1
        args = [command, str(path), "--workers", "0", "--quiet"]
        args += ["--batch-events", str(self.args.batch_events)]
        if command == "ingest":
            args += ["--partitions", str(self.args.partitions)]
        with open(out_path, "wb") as out:
            return self.cli(*args, stdout=out, stderr=self.log), out_path

    def next_fault(self) -> tuple[str | None, int, int]:
        """The next planned fault of a driver run, the applied epoch at which it comes (a
        random point of what is left to do: a time would not do, since on a fast machine a
        short resume ends before it), and the append-only file's size now."""
        fault = self.plan.pop() if self.plan else None
        # (partitions may have applied past the recorded committed epoch: from there)
        start = max(self.committed(), self.applied())
        target = start + max(1, int(self.rng.uniform(0.1, 0.6) * (self.args.events - start)))
        mark = os.path.getsize(self.server.aof()) if self.server is not None else 0
        self.note(f"driver run {self.driver_runs - 1}: {fault or 'no fault'} at epoch {target}")
        return fault, target, mark

    def note(self, text: str) -> None:
        """A line of the chaos run's own in the processes' log, between theirs."""
        self.log.write(f"chaos: {text}\n".encode())
        self.log.flush()

    def run_driver(self, command: str, path: Path) -> list[tuple[int, str]]:
        """Run a driver to its end, or to its planned fault. Returns each driver's exit
        status and output: after a pause, the woken driver's and then those of the one
        that took over (which gets the next planned fault)."""
        driver, out_path = self.start_driver(command, path)
        fault, target, aof_mark = self.next_fault()
        ran: list[tuple[int, str]] = []
        happened = None
        while driver.poll() is None:
            if fault and happened is None and self.applied() >= target:
                if fault == "pause":  # another driver takes over, then this one wakes up
                    taken_over, (fault, target, aof_mark) = self.take_over_from(driver, path)
                    ran.append(self.ended(driver, out_path, "pause"))
                    driver, out_path = taken_over
                    continue
                if fault == "kill":
                    driver.send_signal(signal.SIGKILL)
                    driver.wait()
                else:  # cut
                    assert self.server is not None
                    self.count["bytes cut"] += self.server.lose_tail(
                        aof_mark, self.rng.uniform(0.05, 1.0)
                    )
                happened = fault
            time.sleep(0.002)
        if fault and happened is None:
            self.plan.append(fault)  # the run ended before it: not counted as done
        ran.append(self.ended(driver, out_path, happened))
        return ran

    def take_over_from(
        self, driver: subprocess.Popen[bytes], path: Path
    ) -> tuple[tuple[subprocess.Popen[bytes], Path], tuple[str | None, int, int]]:
        """SIGSTOP the driver, start a resume that takes over once its lock expired, and
        SIGCONT the paused one soon after the new one started (or ended). Returns the new
        driver and its planned fault, planned as it starts."""
        generation = self.generation()
        driver.send_signal(signal.SIGSTOP)
        time.sleep(float(PAUSED_DRIVER_LOCK_TTL) + 0.5)  # (before, a resume is refused: 75)
        new = self.start_driver("resume", path)
        fault = self.next_fault()
        while self.generation() == generation and new[0].poll() is None:
            time.sleep(0.01)
        time.sleep(self.rng.uniform(0, 0.5))
        driver.send_signal(signal.SIGCONT)
        self.count["driver pauses"] += 1
        return new, fault

    def ended(
        self, driver: subprocess.Popen[bytes], out_path: Path, fault: str | None
    ) -> tuple[int, str]:
        """A driver's exit status and output, once it exited; an exit its fault does not
        explain stops the chaos run."""
        code = driver.wait(timeout=600)
        self.note(f"a driver ({fault or 'no fault'}) exited with status {code}")
        self.driver_exits[code] += 1
        if code == -signal.SIGKILL and fault == "kill":
            self.count["driver SIGKILLs"] += 1
        elif fault == "cut":
            self.count["Redis cuts"] += 1
            # (the cut lost nothing the driver had seen: it sent the lost batches again)
            self.count["runs that finished after a cut"] += code == 0
        if code != 0 and code not in EXPECTED_EXITS.get(fault or "", set()):
            raise SystemExit(
                f"a driver run ({fault or 'no fault'}) exited with status {code}: "
                f"see {self.log.name}"
            )
        return code, out_path.read_text()

    def run(self, path: Path) -> list[str]:
        for _ in range(self.args.workers):
            self.start_worker()
        faulter = threading.Thread(target=self.fault_workers, daemon=True)
        faulter.start()
        outputs = []
        command = "ingest"
        try:
            while True:
                ran = self.run_driver(command, path)
                outputs += [text for _, text in ran]
                if ran[-1][0] == 0:
                    break
                command = "resume"
        finally:
            self.done.set()
            faulter.join()
            for w in self.workers:
                w.send_signal(signal.SIGCONT)  # (a paused one too)
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
        prog="python -m bench.chaos",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--worker-kills", type=int, default=10, help="busy workers SIGKILLed")
    parser.add_argument(
        "--worker-pauses", type=int, default=0, help="busy workers paused for 0.2-6 s"
    )
    parser.add_argument("--driver-kills", type=int, default=2, help="drivers SIGKILLed")
    parser.add_argument(
        "--driver-pauses", type=int, default=0,
        help="drivers paused past their lock (2 s), taken over, then woken up",
    )  # fmt: skip
    parser.add_argument(
        "--redis-cuts", type=int, default=0,
        help="times Redis is SIGKILLed and restarted from an append-only file whose tail is "
        "cut (not with --redis-url)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--batch-events", type=int, default=500, help="small batches: more of them to hit"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--redis-url", help="default: a private redis-server with AOF always")
    parser.add_argument(
        "--redis-server", metavar="PATH",
        help="the private server's binary (default: the embedded server's, Redis 6.2)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if (args.redis_cuts or args.redis_server) and args.redis_url:
        parser.error("--redis-cuts and --redis-server need the private server: no --redis-url")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chaos run; 0 when everything matches and every planned fault happened."""
    args = parse_args(argv)
    print(f"chaos seed: {args.seed}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-chaos-"))
    server = None if args.redis_url else PrivateRedis(str(workdir), args.redis_server).start()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    started = time.monotonic()
    ok = False
    try:
        lines = list(generate(args.events, args.users, seed=args.seed))
        path = workdir / "events.json"
        path.write_text("\n".join(lines) + "\n")
        chaos = Chaos(args, url, workdir, server)
        report = verify(lines, chaos.run(path), chaos.states())
        mismatches = report["wrong_lines"] + report["wrong_keys"]
        done = chaos.count
        planned = {
            "worker SIGKILLs": args.worker_kills,
            "worker pauses": args.worker_pauses,
            "driver SIGKILLs": args.driver_kills,
            "driver pauses": args.driver_pauses,
            "Redis cuts": args.redis_cuts,
        }
        print(f"events:                 {args.events:,} ({args.users:,} users)")
        print(f"workers / partitions:   {args.workers} / {args.partitions}")
        for what, n in planned.items():
            if n:
                print(f"{what + ':':<24}{done[what]}")
        if args.redis_cuts:
            print(f"bytes cut:              {done['bytes cut']:,}")
        print(f"driver runs:            {chaos.driver_runs} (exits {exits(chaos.driver_exits)})")
        if chaos.worker_exits:
            print(f"workers that exited:    {exits(chaos.worker_exits)}")
        print(f"lines printed:          {report['printed']:,} ({report['reprinted']:,} again)")
        print(f"wrong or missing lines: {report['wrong_lines']}")
        print(f"wrong or missing keys:  {report['wrong_keys']} of {report['keys']:,}")
        print(f"mismatches:             {mismatches}")
        print(f"wall time:              {time.monotonic() - started:.1f} s")
        if mismatches:
            print(f"logs kept in {workdir}")
            return 1
        if any(done[what] < n for what, n in planned.items() if what != "Redis cuts"):
            print("the run ended before every planned fault happened")
            return 1
        if done["Redis cuts"] < args.redis_cuts:
            print("the run ended before every planned cut", end="")
            if not done["runs that finished after a cut"]:
                print()
                return 1
            print(": a driver run finished exactly after a cut that lost nothing it had seen")
        ok = True
        return 0
    finally:
        if server is not None:
            server.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)


def exits(counts: collections.Counter[int]) -> str:
    """Exit statuses and how many ended so: ``0 x1, 3 x2``."""
    return ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
