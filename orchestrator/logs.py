"""Logging of every process of the pipeline: to stderr, never into the output lines."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from orchestrator.progress import clear_line


def configure_logging(verbose: bool, *, worker: bool = False, quiet: bool = False) -> None:
    """Logs go to stderr, never into the output lines; warnings are one-line notes (errors
    only with ``quiet``)."""
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
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Log records on stderr, each after the progress line (if shown) is erased."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
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
            record.msg = f"{record.getMessage().splitlines()[0]} ({one_line(exc[1])})"
            record.args, record.exc_info, record.exc_text = None, None, None
        text = super().format(record)
        return text.splitlines()[0] if text else text


def one_line(e: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
