"""Careful re-runs: finding the event that kills its worker (a poison pill).

A batch whose worker died is sent again by the driver with a higher attempt
number. From the second attempt on, the worker runs it carefully: before each
range of events it writes where it is to the partition's probe hash
(``Keys.probe``). A careful attempt that finds the probe of an earlier attempt
of the same batch knows that attempt died there (a finished attempt commits
and deletes the probe; one whose process still runs on this host is not
counted). A death while running a single event counts against that event; an
event that two attempts died on is poison: it is rejected with the reason
"killed its worker" (``fail`` stops the batch there, ``skip``/``dead-letter``
leave it out), and every other event runs as usual. Two deaths, not one, so
that a worker killed for another reason (an OOM kill, an operator, the chaos
test) does not condemn an innocent event.

Ranges narrow with each death: an attempt probes each event of the range the
last one died in when that range holds at most ``PROBES`` events, else it
splits it into ``PROBES`` ranges (and the rest of the batch into as many). Each
probe is a write (under ``appendfsync always`` an fsync), so
a careful attempt costs at most about ``2 * PROBES`` of them, whatever the
batch size; a batch of up to ``PROBES`` events finds its poison in three deaths.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any, cast

import orjson
from redis import Redis

from tasks.batch import Batch, Rejection
from tasks.keys import Keys
from tasks.watchdog import GRACE

PROBES = 128
DEATHS = 2  # deaths at one event that make it poison

Event = tuple[int, str, Any]


def _order(batch_id: bytes | None) -> tuple[int, int]:
    """(generation, last epoch) of a probe's batch id ``g<gen>-e<after>-<last>``; a batch
    before every batch for none."""
    found = re.fullmatch(rb"g(\d+)-e-?\d+-(-?\d+)", batch_id or b"")
    return (int(found[1]), int(found[2])) if found else (-1, -1)


def alive_here(host: str, pid: int) -> bool:
    """Whether the process that wrote a probe still runs (only known on this host)."""
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is dead
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def _ranges(n: int, suspect: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Probe ranges over event indices ``0..n``: finest inside the suspect range."""
    lo, hi = suspect if suspect is not None else (0, n)
    lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
    inner = max(1, -(-(hi - lo) // PROBES))
    outer = max(inner, -(-n // PROBES))
    ranges = []
    for start, end, step in ((0, lo, outer), (lo, hi, inner), (hi, n, outer)):
        ranges += [(i, min(i + step, end)) for i in range(start, end, step)]
    return ranges


class CarefulRun:
    """One careful attempt of a batch: its probe, deaths seen so far, and poison events."""

    def __init__(self, r: Redis, keys: Keys, batch: Batch, attempt: int) -> None:
        self.r, self.attempt = r, attempt
        self.key = keys.probe(batch.partition)
        self.batch_id = f"g{batch.generation}-e{batch.after_epoch}-{batch.last_epoch}"
        self.order = (batch.generation, batch.last_epoch)
        self.stale = False  # a newer batch of the partition probes: this one writes nothing
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.wait_for_death = batch.timeout + GRACE + 5.0
        self.deaths: dict[int, int] = {}
        self.hung: set[int] = set()  # events a dead attempt had timed out on before it died
        self.suspect: tuple[int, int] | None = None
        self.timeout = batch.timeout
        self.at = (0, 0)

    def start(self, events: list[Event]) -> dict[int, Rejection]:
        """Read what earlier attempts left; return the poison events (index -> rejection)."""
        stored = cast("dict[bytes, bytes]", self.r.hgetall(self.key))
        if _order(stored.get(b"batch")) > self.order:
            # (an attempt paused and woken after a newer batch began: its commit will be
            # refused; the newer batch's probe and the deaths it counts stay as they are)
            self.stale = True
            return {}
        if stored.get(b"batch") == self.batch_id.encode():
            self.deaths = {int(i): n for i, n in orjson.loads(stored[b"deaths"]).items()}
            self.hung = set(orjson.loads(stored.get(b"hung", b"[]")))
            timed_out = orjson.loads(stored.get(b"timed_out", b"null"))
            suspect = orjson.loads(stored[b"suspect"])
            self.suspect = None if suspect is None else (suspect[0], suspect[1])
            at = orjson.loads(stored[b"at"]) if b"at" in stored else None
            # (only this batch's: an attempt of an older batch, paused and woken, may have
            # written over it since; a probe without a batch id comes from before they had one)
            if at is not None and at[5:] in ([], [self.batch_id]):
                attempt, lo, hi, host, pid = at[:5]
                if attempt < self.attempt and lo < len(events) and self._died(host, pid):
                    if hi - lo == 1:
                        self.deaths[lo] = self.deaths.get(lo, 0) + 1
                        if timed_out in ([attempt, lo], [attempt, lo, self.batch_id]):
                            self.hung.add(lo)
                    self.suspect = (lo, hi)
        self.r.hset(
            self.key,
            mapping={
                "batch": self.batch_id,
                "deaths": orjson.dumps({str(i): n for i, n in self.deaths.items()}),
                "suspect": orjson.dumps(self.suspect),
                "hung": orjson.dumps(sorted(self.hung)),
            },
        )
        self.r.hdel(self.key, "at", "timed_out")
        return {
            i: _killed(events[i], n, self.timeout if i in self.hung else None)
            for i, n in sorted(self.deaths.items())
            if n >= DEATHS
        }

    def _died(self, host: str, pid: int) -> bool:
        """Whether the process of an earlier attempt died (waiting a while if it still runs).

        A hang that holds the GIL and never lets a signal handler run starves the
        lease thread of its worker, so the driver sends the batch again while that
        worker still runs; its backstop ends it within ``timeout + GRACE`` seconds
        (``tasks/watchdog.py``). Waiting for that, with this attempt's lease held,
        lets its death count, rather than every attempt finding the previous one
        alive and no event ever being found.
        """
        if pid == self.pid and host == self.host:
            return False  # an attempt in this very process ended without dying
        deadline = time.monotonic() + self.wait_for_death
        while alive_here(host, pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def probe(self, lo: int, hi: int) -> None:
        """Say that this attempt now runs events ``lo..hi-1`` (before it runs them)."""
        self.at = (lo, hi)
        if self.stale:
            return
        at = [self.attempt, lo, hi, self.host, self.pid, self.batch_id]
        self.r.hset(self.key, "at", orjson.dumps(at))

    def timed_out(self) -> None:
        """Note that the flow ran past the timeout in the current range (called by a tick).

        Should the flow swallow the timeout and the backstop end this process,
        the next attempt reports the event as timed out rather than as killing
        its worker.
        """
        lo, hi = self.at
        if hi - lo == 1 and not self.stale:
            self.r.hset(self.key, "timed_out", orjson.dumps([self.attempt, lo, self.batch_id]))

    def finish(self) -> None:
        """Delete the probe after the batch's commit (or its refusal), if it is still this batch's.

        A newer batch of the partition may be probing by now: its probe stays.
        """
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(self.key)
            if pipe.hget(self.key, "batch") != self.batch_id.encode():
                return
            pipe.multi()
            pipe.delete(self.key)
            pipe.execute()

    def events(
        self, events: list[Event], poison: dict[int, Rejection], start: int = 0
    ) -> ProbingIterator:
        """The batch's events from ``start`` on (the first not committed: a batch commits in
        parts) without the poison ones, writing a probe before each range."""
        skip = {i for i in poison if start <= i < len(events)}
        return ProbingIterator(self, events, skip, _ranges(len(events), self.suspect), start)


class ProbingIterator:
    """Yields events, writing the careful attempt's probe before each range of them."""

    def __init__(
        self,
        run: CarefulRun,
        events: list[Event],
        skip: set[int],
        ranges: list[tuple[int, int]],
        start: int = 0,
    ) -> None:
        self.run, self.events, self.skip = run, events, skip
        self.starts = dict(ranges)
        self.i = self.first = min(start, len(events))
        self.left = len(events) - self.i - len(skip)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while self.i in self.skip:
            self.i += 1
        if self.i >= len(self.events):
            raise StopIteration
        i = self.i
        if i in self.starts:
            self.run.probe(i, self.starts[i])
        elif i == self.first or (self.skip and i - 1 in self.skip):
            # inside a range: at the start of a part, or right after a poison event
            self.run.probe(i, next(e for s, e in self.starts.items() if s <= i < e))
        self.i += 1
        self.left -= 1
        return self.events[i]

    def __length_hint__(self) -> int:
        return self.left


def _killed(event: Event, deaths: int, timeout: float | None) -> Rejection:
    epoch, key, _ = event
    if timeout is not None:  # it timed out, swallowed the timeout, and the backstop ended it
        reason = (
            f"timed out: the flow did not finish epoch {epoch} (key {key!r}) within "
            f"{timeout:g} s (--batch-timeout), and did not stop: {deaths} worker processes "
            "were ended running it"
        )
        return Rejection(epoch, key, reason, "timeout")
    reason = (
        f"killed its worker: {deaths} worker processes died running epoch {epoch} (key {key!r})"
    )
    return Rejection(epoch, key, reason, "killed")
