"""Logging of every process of the pipeline: to stderr, never into the output lines.

Every log line carries an ISO 8601 UTC timestamp, the level, the command and its
pid, and the logger's name; ``--log-format json`` makes each one JSON object
instead (``time``, ``level``, ``logger``, ``message``, ``command``, ``pid``, and the
record's extra fields). Verbosity: by default warnings and errors; ``-v`` shows
this project's debug lines (``orchestrator.*``, ``tasks.*``), ``-vv`` also the
libraries' (RQ, redis-py). The workers a command starts log the same way.

The one-line messages for users (``orchestrator: ...``: errors, refusals, run
summaries, from ``orchestrator.messages``) are not log records: in text mode
they stay as they are; in JSON mode they are JSON objects of the same shape
(logger ``orchestrator``), so that every line on stderr parses.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from orchestrator.progress import clear_line

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
PROJECT_LOGGERS = ("orchestrator", "tasks")

# The attributes every LogRecord has: the others were passed with ``extra=`` and are
# written as fields of a JSON line.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@dataclass(frozen=True)
class LogConfig:
    """How this process logs."""

    verbosity: int = 0  # 0: warnings; 1: this project's debug lines; 2: the libraries' too
    format: LogFormat = "text"
    quiet: bool = False  # errors only
    command: str = "orchestrator"  # named on every line ("ingest", "worker", ...)

    @property
    def library_level(self) -> int:
        """The level of the libraries' loggers (RQ, redis-py)."""
        if self.quiet:
            return logging.ERROR
        return logging.DEBUG if self.verbosity >= 2 else logging.WARNING

    @property
    def project_level(self) -> int:
        """The level of this project's loggers."""
        if self.quiet:
            return logging.ERROR
        return logging.DEBUG if self.verbosity >= 1 else logging.WARNING


_config = LogConfig()


def current() -> LogConfig:
    """The configuration of this process's logging (the default until configured)."""
    return _config


def configure_logging(
    verbosity: int,
    *,
    log_format: LogFormat = "text",
    command: str = "orchestrator",
    quiet: bool = False,
) -> None:
    """Log to stderr (never into the output lines), one line per record, as ``log_format``."""
    global _config
    _config = LogConfig(int(verbosity), log_format, quiet, command)
    handler = _StderrHandler()
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(_config)
    else:
        formatter = TextFormatter(_config)
    handler.setFormatter(formatter)
    # force: a worker forked from a driver replaces the driver's configuration
    logging.basicConfig(level=_config.library_level, handlers=[handler], force=True)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(_config.project_level)


def worker_flags(verbosity: int, log_format: LogFormat) -> list[str]:
    """The options that make an ``orchestrator worker`` process log this way."""
    flags = ["--verbose"] * verbosity
    return [*flags, "--log-format", log_format] if log_format != "text" else flags


# What formatting a record or writing it can raise: logging reports these and goes on.
_LOGGING_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Log records on stderr, each after the progress line (if shown) is erased.

    An exception other than those a format or a write raises came from a signal
    handler that ran meanwhile, and goes on to the code it interrupted: RQ's worker
    stops on SIGTERM by raising StopRequested from its handler, which logging's own
    emit would swallow (printing "--- Logging error ---"), leaving the worker running
    until it was killed (seen with -vv, whose debug lines an idle worker writes often).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            clear_line()
            self.stream.write(text + self.terminator)
            self.flush()
        except _LOGGING_ERRORS:
            self.handleError(record)


def utc_timestamp(created: float) -> str:
    """A time as ISO 8601 in UTC, to the millisecond: ``2026-12-07T16:48:17.123Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL COMMAND[PID] LOGGER: message``, one line per record without -v.

    Without -v an exception becomes its type and message, no traceback (RQ logs a
    job's unexpected exception with its traceback, for example when Redis lost the
    job while a worker ran it); with -v the traceback follows.
    """

    def __init__(self, config: LogConfig) -> None:
        super().__init__()
        self.config = config

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exc = record.exc_info
        if exc and exc[1] is not None and self.config.verbosity == 0:
            message = f"{message.splitlines()[0] if message else ''} ({one_line(exc[1])})"
        elif exc:
            message = f"{message}\n{self.formatException(exc)}"
        if self.config.verbosity == 0:
            message = message.splitlines()[0] if message else message
        head = utc_timestamp(record.created)
        return (
            f"{head} {record.levelname} {self.config.command}[{record.process}] "
            f"{record.name}: {message}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, command, pid, extras."""

    def __init__(self, config: LogConfig) -> None:
        super().__init__()
        self.config = config

    def format(self, record: logging.LogRecord) -> str:
        fields = json_fields(record.created, record.levelname, record.name, record.getMessage())
        fields["pid"] = record.process
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in fields:
                fields[key] = value
        exc = record.exc_info
        if exc and exc[1] is not None:
            fields["exception"] = one_line(exc[1])
            if self.config.verbosity:
                fields["traceback"] = "".join(traceback.format_exception(*exc))
        return json.dumps(fields, default=str)


def json_fields(created: float, level: str, logger: str, message: str) -> dict[str, Any]:
    """The fields every JSON line starts with."""
    return {
        "time": utc_timestamp(created),
        "level": level,
        "logger": logger,
        "message": message,
        "command": _config.command,
        "pid": os.getpid(),
    }


def message_line(message: str, *, level: str, who: str) -> str:
    """A message for users as it is written to stderr: ``WHO: message`` in text mode, a JSON
    object (logger ``orchestrator``) in JSON mode."""
    if _config.format == "json":
        return json.dumps(json_fields(time.time(), level, "orchestrator", message))
    return f"{who}: {message}"


def one_line(e: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
