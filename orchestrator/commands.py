"""The commands behind the CLI that change things: ingest, resume, replay, reset, worker."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis
from redis import Redis

from orchestrator.driver import BadLine, Driver, Housekeeping, RunResult
from orchestrator.errors import InputError
from orchestrator.fence import EvictionWatch, check_consistency, eviction_problem
from orchestrator.lock import DriverLock
from orchestrator.messages import note, say
from orchestrator.metrics import DriverMetrics, DriverServer
from orchestrator.namespace import (
    Checkpoint,
    Committer,
    NamespaceInfo,
    check_compatible,
    checkpoint_at_or_before,
    forget_generation,
    read_info,
    require_committed,
    reset,
    run_layout,
    source_fields,
    start_run,
)
from orchestrator.outcome import recording
from orchestrator.output import OutputStream
from orchestrator.progress import Progress
from orchestrator.reader import (
    Input,
    LineSource,
    PipeInput,
    StreamFingerprint,
    file_sha256,
    fingerprint,
    open_input,
    read_to_epoch,
    seek_epoch,
)
from orchestrator.server import connect, server_config, source_connection
from orchestrator.settings import (
    DEFAULT_FLOW,
    STREAM_OUTPUT,
    STREAM_SOURCE,
    Command,
    Mode,
    Settings,
    redact_url,
)
from orchestrator.sink import open_sink
from orchestrator.streamsource import Position, StreamInput, StreamLost, produce
from orchestrator.workers import WorkerPool
from tasks.errors import ExitStatus, NamespaceError, RedisLostData, Superseded, TornWrite
from tasks.flow import load_flow
from tasks.keys import Keys
from tasks.store import NOTHING
from tasks.tuning import trim_now_and_then


@dataclass(frozen=True)
class Start:
    """Where a run begins: the first epoch, the byte offset of its line, the checkpoint used."""

    epoch: int
    offset: int
    checkpoint: Checkpoint = Checkpoint(0, 0, 0)
    # the run reads again the committed last line that had no newline: its output file is cut
    # back to before that epoch (as a replay from it would)
    reopens: bool = False


def plan_start(
    r: Redis,
    keys: Keys,
    info: NamespaceInfo,
    mode: Mode,
    from_epoch: int | None,
    f: Any,
    path: Path,
) -> Start:
    """Decide where a run begins, refusing what does not fit the namespace.

    Raises:
        NamespaceError: ingest on a namespace with committed epochs; replay out of range.
        InputError: the input is shorter than the committed position.
    """
    committed = info.committed
    if mode == "ingest":
        if committed != NOTHING:
            msg = (
                f"namespace {keys.namespace!r} already has committed epochs (through {committed}); "
                f"continue with 'orchestrator resume {path}', reprocess with 'orchestrator replay "
                f"{path} --from-epoch N', or start over with 'orchestrator reset --yes'"
            )
            raise NamespaceError(msg)
        return Start(0, 0)
    if f is not None and (info.input or "").startswith(STREAM_SOURCE):
        # (its offsets count the bytes of the stream's entries: they mean nothing in a file)
        msg = f"namespace {keys.namespace!r} reads {info.input}, not {path}: resume it with that"
        raise InputError(msg)
    if mode == "resume":
        if not info.exists:
            msg = (
                f"namespace {keys.namespace!r} has no data in this Redis: start it with "
                f"'orchestrator ingest {path}' (if it ran here before, Redis lost its data: "
                f"a restart without persistence, or another server or database)"
            )
            raise NamespaceError(msg)
        if committed == NOTHING:
            note(f"namespace {keys.namespace!r} has no committed epochs: starting at epoch 0")
            return Start(0, 0)
        if info.open_line is not None and info.open_line[0] <= committed:
            # The last line had no newline (cut mid-write, or more lines came after it):
            # its effects are undone, and it is read again from its start.
            epoch, offset = info.open_line
            position_checked(f, path, info, epoch, offset)
            return Start(epoch, offset, checkpoint_at_or_before(r, keys, epoch), reopens=True)
        offset = position_checked(f, path, info, committed + 1, info.offset)
        return Start(committed + 1, offset)
    assert from_epoch is not None
    check_replay_range(info, keys, from_epoch)
    checkpoint = checkpoint_at_or_before(r, keys, from_epoch)
    offset = position(f, path, checkpoint.epoch, checkpoint.offset, from_epoch)
    return Start(from_epoch, offset, checkpoint)


def check_replay_range(info: NamespaceInfo, keys: Keys, from_epoch: int) -> None:
    """Refuse a replay from an epoch that is not committed and retained.

    Raises:
        NamespaceError: nothing committed, or ``from_epoch`` out of range.
    """
    require_committed(info, keys)
    committed = info.committed
    if not info.retained_from <= from_epoch <= committed + 1:
        kept = "" if info.retained_from == 0 else " (older history is past --retain-epochs)"
        msg = (
            f"--from-epoch {from_epoch} is out of range: epochs 0 to {committed} are committed, "
            f"and replay can start at {info.retained_from} to {committed + 1}{kept}"
        )
        raise NamespaceError(msg)


def plan_stream_start(
    r: Redis, keys: Keys, info: NamespaceInfo, mode: Mode, from_epoch: int | None, f: StreamInput
) -> Start:
    """Where a run over a Redis stream begins: the position recorded with the committed epoch
    (resume), or with the checkpoint at or before ``from_epoch`` and the entries after it
    (replay); the stream is checked for entries lost after that position.

    Raises:
        NamespaceError: as ``plan_start``.
        InputError: the namespace's input is not this stream.
        StreamLost: entries after the position were lost.
    """
    path = Path(f.name)
    if not info.exists and mode != "ingest":  # (as for a file: nothing to resume or replay)
        return plan_start(r, keys, info, mode, from_epoch, None, path)
    if mode == "ingest" or (mode == "resume" and info.committed == NOTHING):
        start = plan_start(r, keys, info, mode, None, None, path)
        recorded = checkpoint_at_or_before(r, keys, 0).source_position if info.exists else None
        f.start_at(None if recorded is None else Position.decode(recorded), 0)
        f.open()
        return start
    if info.input != f.name:
        msg = (
            f"namespace {keys.namespace!r} reads {info.input}, not {f.name}: resume or replay "
            f"it with its own input, or use a new namespace"
        )
        raise InputError(msg)
    if mode == "resume":
        if info.source_position is None:
            msg = f"namespace {keys.namespace!r} has no recorded position in {f.name}"
            raise InputError(msg)
        f.start_at(Position.decode(info.source_position), info.offset)
        f.open()
        return Start(info.committed + 1, info.offset)
    assert from_epoch is not None
    check_replay_range(info, keys, from_epoch)
    checkpoint = checkpoint_at_or_before(r, keys, from_epoch)
    if checkpoint.source_position is None:
        msg = f"namespace {keys.namespace!r} has no recorded position before epoch {from_epoch}"
        raise InputError(msg)
    f.start_at(Position.decode(checkpoint.source_position), checkpoint.offset)
    f.open()
    f.skip(from_epoch - checkpoint.epoch)
    return Start(from_epoch, f.position, checkpoint)


def position(f: Input, path: Path, epoch: int, offset: int, target: int) -> int:
    """Go to line ``target`` of the input from a known (epoch, offset); return its offset.

    A file seeks; a pipe is read (and hashed) up to there.

    Raises:
        InputError: the input ends before.
    """
    if not isinstance(f, PipeInput):
        return seek_epoch(f, path, epoch, offset, target)
    f.blocking = True
    if f.skip_to(offset) < offset:
        msg = (
            f"{path} ended after {f.position:,} bytes, before the committed position (byte "
            f"{offset:,}, epoch {epoch}): give the same input again from its start"
        )
        raise InputError(msg)
    offset = read_to_epoch(f, path, epoch, offset, target)
    f.hash_at(offset)
    return offset


def position_checked(f: Input, path: Path, info: NamespaceInfo, epoch: int, offset: int) -> int:
    """Go to the resume point (line ``epoch`` at ``offset``), refusing an input whose part
    before it differs from the one committed. A pipe is checked on its way there."""
    if isinstance(f, PipeInput):
        check_unchanged(f, path, info, offset)
        return position(f, path, epoch, offset, epoch)
    offset = position(f, path, epoch, offset, epoch)
    check_unchanged(f, path, info, offset)
    return offset


def check_unchanged(f: Input, path: Path, info: NamespaceInfo, resume_at: int) -> None:
    """Refuse an input whose part before the resume point differs from the one committed:
    the full sha256 that a run from a pipe recorded, or the sampled fingerprint of a file's.

    Raises:
        InputError: the committed prefix does not match (or a pipe ends before it).
    """
    if info.prefix_sha256 is not None:
        end, recorded, what = info.prefix_end, info.prefix_sha256, "sha256"
        if isinstance(f, PipeInput):
            _skip_checked(f, path, info, end)
            got = f.hash_at(end)
        else:
            got = file_sha256(f, end)
    elif info.fingerprint is not None:
        end, recorded, what = info.fingerprint_end, info.fingerprint, "fingerprint"
        if isinstance(f, PipeInput):
            if end > resume_at:  # (a committed last line without newline, read from a file)
                msg = (
                    f"{path}: cannot check a pipe against the input committed through epoch "
                    f"{info.committed} (it was a file, whose last line had no newline): "
                    f"resume with the file itself"
                )
                raise InputError(msg)
            sampled = StreamFingerprint(end)
            f.watch = sampled.feed
            _skip_checked(f, path, info, end)
            f.watch = None
            got = sampled.digest()
        else:
            got = fingerprint(f, end)
    else:
        return
    if got == recorded:
        return
    msg = (
        f"{path} has changed before the resume point (its first {end:,} bytes differ from "
        f"the input committed through epoch {info.committed}, by {what}): resume would mix "
        f"two inputs; restore the input, replay from an epoch before the change, or reset"
    )
    raise InputError(msg)


def _skip_checked(f: PipeInput, path: Path, info: NamespaceInfo, end: int) -> None:
    f.blocking = True
    if f.skip_to(end) < end:
        msg = (
            f"{path} ended after {f.position:,} bytes, before the committed position (byte "
            f"{end:,}, epoch {info.committed}): resume expects the same input again from its "
            f"start"
        )
        raise InputError(msg)


def persistence_warning(r: Redis) -> str | None:
    """A warning when the server's settings could lose acknowledged commits on a restart."""
    try:
        appendonly = server_config(r, "appendonly")
        fsync = server_config(r, "appendfsync")
    except redis.ResponseError:
        return (
            "cannot read the server's persistence settings (CONFIG is disabled): make sure it "
            "runs with appendonly yes and appendfsync always, or a restart can lose commits"
        )
    if appendonly != "yes":
        return (
            "the Redis server runs with appendonly no: a restart of it loses committed epochs "
            "(set appendonly yes and appendfsync always)"
        )
    if fsync != "always":
        return (
            f"the Redis server runs with appendfsync {fsync}: a crash of its machine can lose "
            "the last second of commits (set appendfsync always)"
        )
    return None


def run_pipeline(
    settings: Settings, mode: Command, path: Path, from_epoch: int | None = None
) -> RunResult:
    """Run ingest, resume or replay to the end of the input (or its first bad line)."""
    keys = Keys(settings.namespace)
    if settings.flow is not None:
        load_flow(settings.flow)  # a flow that cannot load is refused before anything starts
    metrics = None
    if settings.metrics is not None:  # (a port in use is refused before anything starts)
        metrics = DriverServer(
            settings.metrics,
            DriverMetrics(keys.namespace, settings.on_error),
            settings.worker_count,
        )
    stream = str(path).startswith(STREAM_SOURCE)
    with (
        contextlib.nullcontext() if stream else open_input(path) as opened,
        connect(settings) as conn,
        # (a run that cannot open its input or reach Redis leaves no outcome)
        recording(conn.client, conn.url, keys, mode, resume_hint(settings, path)) as outcome,
        source_connection(settings.source_url if stream else None, conn.client) as source_r,
    ):
        f: Input | StreamInput
        if opened is None:
            key = str(path).removeprefix(STREAM_SOURCE)
            f = StreamInput(source_r, key, field=settings.source_field, follow=settings.follow)
        else:
            f = opened
        # The worker processes start first: forked before the driver lock starts its
        # thread, they begin with everything imported (a resume's fixed cost is mostly
        # start-up time). Refused by the lock, the run stops them again.
        pool = WorkerPool(
            settings.worker_count,
            conn.url,
            keys.namespace,
            verbose=settings.verbose,
            log_format=settings.log_format,
            quiet=settings.quiet,
            client=conn.client,
            metrics=settings.metrics,
        )
        pool.start()
        try:
            if metrics is not None:
                metrics.server.start()  # (its thread: after the fork)
            with DriverLock(conn.client, keys) as lock:
                outcome.token = lock.token  # (whose run meta names: this one, or a newer)
                r = conn.client
                housekeeping = partial(RunHousekeeping, pool, r, metrics)
                result = drive(
                    settings, mode, path, from_epoch, f, r, conn.embedded, housekeeping, lock,
                    None if metrics is None else metrics.metrics,
                )  # fmt: skip
        except TornWrite:
            raise  # (no resume continues: the message says to start over)
        except RedisLostData as e:
            after = _what_resume_does(conn.client, keys, path, resume_hint(settings, path))
            raise RedisLostData(f"{e}; {after}") from e
        finally:
            pool.stop()
            if metrics is not None:
                metrics.close()
        outcome.finish(run_exit_status(result), run_reason(path, result))
        return result


def run_exit_status(result: RunResult) -> ExitStatus:
    """A finished run's exit status: a bad line that stopped it (under fail) is bad input."""
    return ExitStatus.DATA_ERROR if result.failure is not None else ExitStatus.OK


def run_reason(path: Path, result: RunResult) -> str:
    """A finished run's outcome in one line."""
    if result.failure is not None:
        return f"{describe_bad(path, result.failure)}; committed through epoch {result.committed}"
    skipped = f", {len(result.skipped)} bad lines left out" if result.skipped else ""
    return f"done: {result.events} events read, committed through epoch {result.committed}{skipped}"


def _what_resume_does(r: Redis, keys: Keys, path: Path, resume: str) -> str:
    """After a detected data loss: what Redis still holds, and the command that continues
    (``resume``)."""
    try:
        info = read_info(r, keys)
    except redis.RedisError:
        return f"once Redis is back, '{resume}' continues from what it holds"
    if not info.exists:
        start_over = resume.replace("orchestrator resume", "orchestrator ingest", 1)
        return f"Redis holds nothing of the namespace: start over with '{start_over}'"
    return (
        f"'{resume}' continues after epoch {info.committed}, the last epoch Redis still holds "
        f"as committed"
    )


def check_server(r: Redis, settings: Settings, embedded: bool) -> None:
    """Refuse a server that may evict the pipeline's keys; warn about weak persistence.

    Raises:
        NamespaceError: the eviction policy can evict keys (without --allow-eviction).
    """
    if problem := eviction_problem(r):
        if not settings.allow_eviction:
            raise NamespaceError(problem)
        say(f"warning: {problem.split(';')[0]} (allowed by --allow-eviction)", level="WARNING")
    if not embedded and (warning := persistence_warning(r)):
        say(f"warning: {warning}", level="WARNING")


def chosen_mode(command: Command, info: NamespaceInfo) -> Mode:
    """``run`` is an ingest on a namespace without committed epochs, a resume otherwise."""
    if command != "run":
        return command
    return "ingest" if info.committed == NOTHING else "resume"


def drive(
    settings: Settings,
    command: Command,
    path: Path,
    from_epoch: int | None,
    f: Any,
    r: Redis,
    embedded: bool,
    housekeeping: Callable[[Keys, int], Housekeeping],
    lock: DriverLock,
    metrics: DriverMetrics | None = None,
) -> RunResult:
    """A run on a connected Redis, holding the namespace's lock: plan where it starts, claim
    the partitions, drive the batches to the end of the input, record the last commit.

    ``housekeeping(keys, partitions)`` gives what runs beside the driver (worker processes).
    """
    keys = Keys(settings.namespace)
    info = read_info(r, keys)
    mode = chosen_mode(command, info)
    partitions = check_compatible(info, settings.partitions, settings.flow)
    flow = settings.flow or info.flow or DEFAULT_FLOW
    load_flow(flow)
    if isinstance(f, StreamInput):
        start = plan_stream_start(r, keys, info, mode, from_epoch, f)
    else:
        start = plan_start(r, keys, info, mode, from_epoch, f, path)
    check_server(r, settings, embedded)
    if mode != "ingest":
        # (with the names it has now: a rescale at the run's start may rename them)
        now = Keys(keys.namespace, info.tagged)
        check_consistency(r, now, info.floors, start.epoch, info.evicted_keys, torn=info.torn)
    sink_mode: Mode = "replay" if start.reopens else mode
    output: Path | OutputStream | None = settings.output
    if settings.output_stream is not None:
        output = OutputStream(settings.output_stream, settings.output_maxlen)
    with open_sink(output, sink_mode, info, start.checkpoint, start.epoch, r) as sink:
        starting = time.monotonic()
        fence = start_run(
            r,
            keys,
            token=lock.token,
            lock_ttl_ms=lock.ttl_ms,
            info=info,
            partitions=partitions,
            flow=flow,
            input_name=str(path),
            start_epoch=start.epoch,
            start_offset=start.offset,
            output=sink.name,
            output_length=sink.start_length,
            output_stream=sink.entries,
            source_fields=f.fields if isinstance(f, StreamInput) else None,
        )
        generation = fence.generation
        if metrics is not None:
            metrics.restore_seconds.set(time.monotonic() - starting, metrics.ns)
            metrics.retain_epochs.set(settings.retain_epochs, metrics.ns)
        evictions = EvictionWatch(r, keys)
        committer = Committer(
            r,
            keys,
            partitions,
            fence,
            last_committed=start.epoch - 1,
            input_path=str(path),
            retain_epochs=settings.retain_epochs,
            evictions=evictions,
            output_stream=sink.entries,
            source_fields=f.fields if isinstance(f, StreamInput) else source_fields(f),
        )
        if metrics is not None:
            metrics.committer = committer
            metrics.retained_from.set(0 if mode == "ingest" else info.retained_from, metrics.ns)
        progress = Progress(enabled=not settings.quiet)
        driver: Driver | None = None
        try:
            driver = Driver(
                r,
                keys,
                generation=generation,
                partitions=partitions,
                slots=run_layout(info, partitions).slots,
                flow_path=flow,
                on_error=settings.on_error,
                out=sink.stream,
                housekeeping=housekeeping(keys, partitions),
                progress=progress,
                on_commit=committer.record,
                batch_events=settings.batch_events,
                batch_timeout=settings.batch_timeout,
                output_is_file=sink.path is not None,
                output_stream=sink.entries,
                metrics=metrics,
            )
            # (a followed file is watched by its name: standard input has none)
            name = None if str(path) == "-" or isinstance(f, StreamInput) else path
            source = LineSource(
                f, start.epoch, start.offset, settings.max_line_bytes, settings.follow, name
            )
            result = driver.run(source)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM (the second is ignored): record the committed epoch, so that
            # resume repeats nothing that this run committed and wrote.
            if driver is not None:
                driver.record_interrupted()
            raise
        except (RedisLostData, Superseded):
            # What this run staged between the fault and noticing it serves nobody now.
            with contextlib.suppress(redis.RedisError):
                forget_generation(r, keys, generation)
            evictions.check(now=True)  # if keys were evicted, say that instead (and mark it)
            raise
        finally:
            progress.close()
        committer.record(
            result.committed,
            result.next_offset,
            [],
            floors=driver.after,
            output_length=driver.output_length(),
            open_line=driver.open_line_through(result.committed),
            final=True,
        )
    if isinstance(f, StreamInput) and f.stopped is not None:
        msg = f"{f.stopped}; stopped after epoch {result.committed} (everything before committed)"
        raise StreamLost(msg)
    if source.stopped is not None:
        msg = (
            f"{path} {source.stopped} while it was followed: stopped after epoch "
            f"{result.committed}, everything read before is committed; continue with a new "
            f"namespace (or 'orchestrator reset --yes') for the new file"
        )
        raise InputError(msg)
    return result


class RunHousekeeping:
    """Beside a run: replace worker processes that died, trim memory, say workers are missing."""

    def __init__(
        self, pool: WorkerPool, r: Redis, server: DriverServer | None, keys: Keys, partitions: int
    ) -> None:
        self.pool, self.r, self.keys, self.partitions = pool, r, keys, partitions
        self.metrics = None if server is None else server.metrics

    def between_reads(self) -> None:
        self.pool.supervise(self.r)
        trim_now_and_then()
        if self.metrics is not None:
            m = self.metrics
            m.restarts.values[m.ns] = self.pool.restarts
            m.workers.set(sum(proc.poll() is None for proc in self.pool.processes), m.ns)

    def batches_wait(self) -> None:
        self.pool.note_if_none(self.r, self.keys, self.partitions)


def describe_bad(path: Path, bad: BadLine) -> str:
    """``FILE:LINE (epoch E): reason``."""
    return f"{path}:{bad.line_number} (epoch {bad.epoch}): {bad.reason}"


def resume_hint(settings: Settings, path: Path) -> str:
    """The command that resumes this run, with the options that locate its namespace and its
    output file."""
    parts = ["orchestrator", "resume", str(path)]
    if settings.namespace != Settings.namespace:
        parts += ["--namespace", settings.namespace]
    if settings.redis_url is None and settings.data_dir != Settings.data_dir:
        parts += ["--data-dir", str(settings.data_dir)]
    if settings.partitions is not None:  # (a rescale that was asked for and may not be done)
        parts += ["--partitions", str(settings.partitions)]
    if settings.output is not None:
        parts += ["--output", str(settings.output)]
    elif settings.output_stream is not None:
        parts += ["--output", f"{STREAM_OUTPUT}{settings.output_stream}"]
    if str(path).startswith(STREAM_SOURCE):
        if settings.source_field != Settings.source_field:
            parts += ["--source-field", settings.source_field]
        if settings.source_url is not None:  # (never its password: the variable holds it)
            shown = settings.source_url
            if redact_url(shown) != shown:
                shown = '"$ORCHESTRATOR_SOURCE_URL"'
            parts += ["--source-url", shown]
    if settings.follow:
        parts.append("--follow")
    return " ".join(parts)


def produce_lines(settings: Settings, key: str, path: Path) -> int:
    """``orchestrator produce``: add each line of ``path`` to the stream ``key``; the count.

    Raises:
        InputError: the file cannot be read.
    """
    with open_input(path) as f, connect(settings) as conn:
        if isinstance(f, PipeInput):
            f.blocking = True
        with source_connection(settings.source_url, conn.client) as r:
            return produce(r, key, iter(f.readline, b""), settings.source_field)


def reset_namespace(settings: Settings) -> int:
    """Delete the namespace's data; refused while a driver holds the namespace.

    Reset takes the driver lock itself, so no run can start while it deletes; a
    driver paused past its lock's TTL finds its data gone when it wakes up, and
    stops without writing (its writes are fenced by the generation).
    """
    keys = Keys(settings.namespace)
    with connect(settings) as conn, DriverLock(conn.client, keys):
        return reset(conn.client, keys)
