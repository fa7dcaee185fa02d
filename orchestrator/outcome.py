"""The last run's outcome: recorded in Redis as a run ends, failed or not, for ``status``.

A run (``ingest``, ``resume``, ``replay``, ``run``) records once, at its end, on a fresh
connection that does not retry: what it ran, when it started and ended, its exit status
and why (one line), and how far it got. A run whose Redis is gone cannot record: the
previous outcome then stays (the command's own exit status and message still say why);
nor is an outcome written into a namespace that holds nothing (a run refused before it
created the namespace, or one whose namespace was reset under it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis
from redis import Redis

from orchestrator.failures import failure
from orchestrator.namespace import read_info
from orchestrator.server import client_for
from tasks.errors import ExitStatus
from tasks.keys import Keys

logger = logging.getLogger(__name__)


def iso_utc(unix_time: float | None) -> str | None:
    """ISO 8601 in UTC, to the millisecond (``2026-12-07T17:03:04.512Z``); None stays None."""
    if unix_time is None:
        return None
    moment = datetime.fromtimestamp(unix_time, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Outcome:
    """How a run ended (the ``last_run`` of ``status``)."""

    command: str
    started_at: str | None
    ended_at: str | None = None
    exit_status: int | None = None
    reason: str | None = None
    generation: int | None = None  # None: the run ended before it started a generation
    first_epoch: int | None = None
    committed_epoch: int | None = None
    epochs: int | None = None  # epochs committed by the run
    events: int | None = None  # events committed by the run


class OutcomeRecorder:
    """Collects a run's outcome while it goes; ``recording`` writes it when the run ends."""

    def __init__(self, r: Redis, url: str, keys: Keys, command: str) -> None:
        self.url = url
        self.keys = keys
        self.outcome = Outcome(command, iso_utc(time.time()))
        self.generation_before = read_info(r, keys).generation
        self.status: int | None = None  # set by the run when it returns normally
        self.reason: str | None = None
        self.token: str | None = None  # the run's driver lock token, once it holds the lock

    def finish(self, status: int, reason: str) -> None:
        """The run returned: its exit status and a one-line reason."""
        self.status, self.reason = status, reason

    def record(self, error: BaseException | None, resume: str | None) -> None:
        """Write the outcome (best effort: never raises, never waits long)."""
        outcome = self.outcome
        outcome.ended_at = iso_utc(time.time())
        if error is not None:
            status, reason = failure(error, resume) or (
                int(ExitStatus.FAILED),
                f"internal error: {type(error).__name__}: {error}",
            )
        else:
            status, reason = self.status or 0, self.reason or "done"
        outcome.exit_status, outcome.reason = status, reason.splitlines()[0] if reason else ""
        try:
            client = client_for(self.url, retry=False)
        except Exception:  # noqa: BLE001 - the URL was usable a moment ago; nothing to record
            return
        try:
            newer = self._count(client)
            # Not into a namespace that holds nothing (never started, or reset meanwhile):
            # reset leaves no key behind, even when the run it stopped ends after it.
            with client.pipeline() as pipe:
                pipe.watch(self.keys.meta, self.keys.last_run)
                # (nor over the outcome of the run that took over from this one, paused)
                taken_over = newer is not None and _recorded_generation(pipe, self.keys) == newer
                if pipe.exists(self.keys.meta) and not taken_over:
                    pipe.multi()
                    pipe.set(self.keys.last_run, orjson.dumps(asdict(outcome)))
                    pipe.execute()
        except redis.RedisError as e:  # (a WatchError too: reset just now)
            logger.debug("could not record the run's outcome: %s", e)
        finally:
            client.close()

    def _count(self, r: Redis) -> int | None:
        """How far the run got, from what its driver recorded (if it started a generation).

        Returns:
            The generation of a run that another driver started after this one began
            (this one was paused, or cut off, and superseded), else None.
        """
        info = read_info(r, self.keys)
        if info.generation == self.generation_before:
            return None
        started_by = r.hget(self.keys.meta, "run")
        if self.token is None or started_by != self.token.encode():
            return info.generation  # (its figures are that run's, not this one's)
        outcome = self.outcome
        outcome.generation = info.generation
        outcome.committed_epoch = info.committed
        outcome.first_epoch = info.run_first_epoch
        outcome.events = info.committed_events
        if info.run_first_epoch is not None:
            outcome.epochs = max(0, info.committed - info.run_first_epoch + 1)
        return None


@contextlib.contextmanager
def recording(
    r: Redis, url: str, keys: Keys, command: str, resume: str | None
) -> Iterator[OutcomeRecorder]:
    """Record the run's outcome when the block ends, however it ends (the exception goes on)."""
    recorder = OutcomeRecorder(r, url, keys, command)
    try:
        yield recorder
    except BaseException as e:
        recorder.record(e, resume)
        raise
    recorder.record(None, resume)


def _recorded_generation(r: Redis, keys: Keys) -> int | None:
    stored = last_run(r, keys)
    return None if stored is None else stored["generation"]


def last_run(r: Redis, keys: Keys) -> dict[str, Any] | None:
    """The last recorded outcome, or None."""
    raw = r.get(keys.last_run)
    if raw is None:
        return None
    loaded: dict[str, Any] = orjson.loads(cast("bytes", raw))
    return {field: loaded.get(field) for field in Outcome.__dataclass_fields__}
