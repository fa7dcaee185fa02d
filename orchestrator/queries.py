"""Read-only commands: ``status``, ``state KEY`` (as of any retained epoch), ``dead-letters``."""

from __future__ import annotations

import re
import shlex
import time
from typing import Any, cast

import orjson
from redis import Redis

from orchestrator.lock import driver_running
from orchestrator.namespace import NamespaceInfo, read_info, require_committed
from orchestrator.outcome import iso_utc, last_run
from orchestrator.sentinel import is_sentinel_url, parse_sentinel_url
from orchestrator.server import connect, source_connection
from orchestrator.settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_NAMESPACE,
    STREAM_SOURCE,
    Settings,
    redact_url,
)
from orchestrator.streamsource import Position, lag
from orchestrator.workers import listening_workers
from tasks.errors import NamespaceError, TornWrite
from tasks.keys import Keys, partition_of
from tasks.store import (
    NOTHING,
    PROGRESS_FIELDS,
    applied_epochs,
    decode_progress,
    namespace_flow,
    torn_message,
)
from tasks.undo import first_befores_after


def rq_worker_command(url: str, keys: Keys, partitions: int) -> str:
    """The plain ``rq worker`` command line that works on this namespace's queues."""
    queues = " ".join(shlex.quote(name) for name in keys.queue_names(partitions))
    if is_sentinel_url(url):  # rq's --url has no sentinel form: its settings module does
        address = parse_sentinel_url(url)
        settings = {
            "INSTANCES": list(address.sentinels),
            "MASTER_NAME": address.service,
            "DB": address.db,
        }
        auth = ", plus PASSWORD" if address.password else ""
        return (
            f"rq worker -c SETTINGS --serializer json {ROUND_ROBIN} {queues}  "
            f"(SETTINGS: a module with SENTINEL = {settings!r}{auth})"
        )
    # Double quotes, so that a pasted "$REDIS_URL" is expanded (never print a password).
    if redact_url(url) != url:
        shown = '"$REDIS_URL"'
    else:
        shown = '"' + _SHELL_SPECIAL.sub(r"\\\g<0>", url) + '"'
    return f"rq worker --url {shown} --serializer json {ROUND_ROBIN} {queues}"


# RQ's default takes the first non-empty queue: partitions whose next batch is always queued
# keep every worker, and the others wait (docs/performance.md, Latency).
ROUND_ROBIN = "--dequeue-strategy round_robin"


_SHELL_SPECIAL = re.compile(r'["$`\\]')  # what a backslash escapes inside double quotes


def orchestrator_worker_command(settings: Settings) -> str:
    """The ``orchestrator worker`` command line that joins this embedded server."""
    command = "orchestrator worker"
    if settings.data_dir != DEFAULT_DATA_DIR:
        command += f" --data-dir {shlex.quote(str(settings.data_dir))}"
    if settings.namespace != DEFAULT_NAMESPACE:
        command += f" --namespace {shlex.quote(settings.namespace)}"
    return command


# Of docs/status.schema.json: keys are only added (readers ignore what they do not know);
# renaming or removing one, or changing its meaning, raises it.
STATUS_SCHEMA_VERSION = 1


def status(settings: Settings) -> dict[str, Any]:
    """Committed epoch, partition progress and backlog, queues, workers, rate, retention.

    Every key of docs/status.schema.json is there, null when unknown.
    """
    keys = Keys(settings.namespace)
    with connect(settings) as conn:
        r = conn.client
        info = read_info(r, keys)
        driver = driver_running(r, keys)
        report: dict[str, Any] = {
            "schema_version": STATUS_SCHEMA_VERSION,
            "generated_at": iso_utc(time.time()),
            "namespace": keys.namespace,
            "redis": redact_url(conn.url)
            if not conn.embedded
            else f"embedded ({settings.data_dir})",
            "input": info.input,
            "output": info.output,
            "flow": info.flow,
            "partitions": info.partitions,
            "committed_epoch": info.committed if info.exists else None,
            "next_offset": info.offset if info.exists else None,
            "read_epoch": info.read_epoch,
            "lag_epochs": _lag(info),
            "lag_events": lag_events(r, keys) if driver else None,
            "events_per_s": info.events_per_s,
            "committed_events_per_s": info.committed_events_per_s,
            "recorded_at": iso_utc(info.at),
            "driver": driver,
            "last_run": last_run(r, keys),
            "retention": {
                "retain_epochs": info.retain_epochs,
                "replayable_from": info.retained_from if info.exists else None,
            },
            "dead_letters": r.xlen(keys.dead_letters),
            "partition_progress": None,
            "workers": listening_workers(r, keys, info.partitions or 1),
            "queues": None,
            "rq_worker_command": None,
            "worker_command": None,
            # a redis-stream:KEY input's committed entry id, and how far the stream is ahead
            "source_position": None,
            "source_lag_entries": None,
            "source_lag_seconds": None,
            # a rescale under way (or killed before its last step: the next run deletes it)
            "rescale": None,
        }
        if info.staged_rescale is not None:
            generation, partitions, steps = info.staged_rescale
            running = driver is not None and info.generation == generation
            report["rescale"] = {"to_partitions": partitions, "steps_staged": steps,
                                 "running": running}  # fmt: skip
        if info.partitions is None:
            return report
        if info.input is not None and info.input.startswith(STREAM_SOURCE):
            with source_connection(settings.source_url, r) as source_r:
                report |= source_lag(source_r, info)
        # (under the names it has: its next run moves names made before hash tags)
        stored = Keys(keys.namespace, info.tagged)
        report["partition_progress"] = _partitions(r, stored, info.partitions)
        report["queues"] = keys.queue_names(info.partitions)
        if conn.embedded:  # its unix socket is gone when the command that started it ends
            report["worker_command"] = orchestrator_worker_command(settings)
        else:
            report["rq_worker_command"] = rq_worker_command(conn.url, keys, info.partitions)
        return report


def lag_events(r: Redis, keys: Keys) -> int:
    """Events the running driver has read and the partitions not yet committed."""
    backlog = cast("dict[bytes, bytes]", r.hgetall(keys.backlog))
    return sum(int(n) for n in backlog.values())


def source_lag(r: Redis, info: NamespaceInfo) -> dict[str, Any]:
    """A Redis stream input: the committed position, and how far the stream's newest entry
    is ahead of it (entries, seconds)."""
    assert info.input is not None
    position = Position.decode(info.source_position or "0-0:")
    key = info.input.removeprefix(STREAM_SOURCE)
    return {"source_position": position.id, **lag(r, key, position)}


def _lag(info: NamespaceInfo) -> int | None:
    if info.read_epoch is None or not info.exists:
        return None
    return max(0, info.read_epoch - info.committed)


def _partitions(r: Redis, keys: Keys, partitions: int) -> list[dict[str, Any]]:
    applied = applied_epochs(r, keys, partitions)
    pipe = r.pipeline(transaction=False)
    for partition in range(partitions):
        pipe.llen(keys.queue_key(partition))
    pipe.hgetall(keys.backlog)
    *depths, backlog = pipe.execute()
    waiting = {int(p): int(n) for p, n in backlog.items()}
    return [
        {
            "partition": p,
            "applied_through": applied[p],
            "backlog_events": waiting.get(p, 0),
            "queued_jobs": depths[p],
        }
        for p in range(partitions)
    ]


def key_state(settings: Settings, key: str, at_epoch: int | None) -> dict[str, Any]:
    """The committed state of one key, now or as it was at the end of a retained epoch.

    Raises:
        NamespaceError: nothing committed yet, or the epoch is outside the retained window.
    """
    with connect(settings) as conn:
        return state_of(conn.client, Keys(settings.namespace), key, at_epoch)


def state_of(r: Redis, keys: Keys, key: str, at_epoch: int | None) -> dict[str, Any]:
    """``key_state`` on a connected Redis."""
    info = read_info(r, keys)
    require_committed(info, keys)
    assert info.partitions is not None
    keys = Keys(keys.namespace, info.tagged)
    epoch = info.committed if at_epoch is None else at_epoch
    if not info.retained_from - 1 <= epoch <= info.committed:
        msg = (
            f"--at-epoch {epoch} is out of range: states are kept for epochs "
            f"{max(info.retained_from - 1, NOTHING)} to {info.committed}"
        )
        raise NamespaceError(msg)
    p = partition_of(key, info.partitions, info.slots)
    if info.torn:
        raise TornWrite(torn_message("the namespace's meta"))
    decode_progress(r.hmget(keys.progress(p), PROGRESS_FIELDS))  # (raises TornWrite if torn)
    return {"key": key, "partition": p, "epoch": epoch, "state": _state_at(r, keys, p, key, epoch)}


def _state_at(r: Redis, keys: Keys, p: int, key: str, epoch: int) -> Any:
    """A key's state at the end of ``epoch``: its current state, unless an event after
    ``epoch`` changed it — then the before-image of the first such event."""
    pipe = r.pipeline(transaction=False)
    pipe.hget(keys.state(p), key)
    pipe.zrangebyscore(keys.undo(p), f"({epoch}", "+inf")
    current, records = pipe.execute()
    source = namespace_flow(r, keys)
    for record in records:  # in epoch order
        found = first_befores_after(record, epoch, source, only=key)
        if key in found:
            before = found[key]
            return None if before is None else orjson.loads(before)
    return None if current is None else orjson.loads(current)


def list_dead_letters(settings: Settings) -> list[dict[str, Any]]:
    """The namespace's dead letters, oldest first."""
    keys = Keys(settings.namespace)
    with connect(settings) as conn:
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]", conn.client.xrange(keys.dead_letters)
        )
    return [
        {
            "id": entry_id.decode(),
            "epoch": int(fields[b"epoch"]),
            "line": int(fields[b"line"]),
            "input": fields[b"input"].decode(),
            "reason": fields[b"reason"].decode(),
            "raw": fields[b"raw"].decode("utf-8", "backslashreplace").rstrip("\r\n"),
        }
        for entry_id, fields in entries
    ]


def clear_dead_letters(settings: Settings) -> int:
    """Empty the namespace's dead-letter stream; returns how many there were."""
    keys = Keys(settings.namespace)
    with connect(settings) as conn:
        count = int(conn.client.xlen(keys.dead_letters))
        conn.client.delete(keys.dead_letters)
    return count
