"""The settings of one command, built once from flags and environment at the CLI edge."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, unquote_plus

from orchestrator.logs import LogFormat
from tasks.batch import OnError
from tasks.metrics import Address

DEFAULT_NAMESPACE = "cart-join"
DEFAULT_DATA_DIR = Path(".orchestrator")
DEFAULT_PARTITIONS = 4
# Every partition is an RQ queue that each worker listens on and a batch the driver
# keeps in flight: a huge count makes even a tiny input slow (docs/performance.md).
MAX_PARTITIONS = 4096
DEFAULT_EMBEDDED_WORKERS = 2
DEFAULT_FLOW = "tasks.cartjoin:flow"

Mode = Literal["ingest", "resume", "replay"]
# What the CLI asks for: one of those, or "run" (ingest on an empty namespace, else resume)
Command = Literal["ingest", "resume", "replay", "run"]

# --output redis-stream:KEY writes the output lines to a Redis stream (orchestrator/sink.py)
STREAM_OUTPUT = "redis-stream:"
# ingest/resume/replay/run redis-stream:KEY read the input from a Redis stream
# (orchestrator/streamsource.py)
STREAM_SOURCE = "redis-stream:"
DEFAULT_SOURCE_FIELD = "event"


@dataclass(frozen=True)
class Settings:
    """What a command needs to reach Redis and run the pipeline."""

    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    data_dir: Path = DEFAULT_DATA_DIR
    partitions: int | None = None
    # None: 2 with the embedded server, 0 (external workers) with a URL
    workers: int | None = None
    on_error: OnError = "fail"
    output: Path | None = None
    # --output redis-stream:KEY: the stream the output lines go to (then ``output`` is None),
    # and --output-maxlen, the most entries it keeps
    output_stream: str | None = None
    output_maxlen: int | None = None
    # None: the namespace's stored flow, or the cart join for a new namespace
    flow: str | None = None
    # -v: 1 for this project's debug logs, 2 (-vv) for the libraries' too
    verbose: int = 0
    log_format: LogFormat = "text"
    quiet: bool = False
    retain_epochs: int = 100_000
    max_line_bytes: int = 1 << 20
    batch_events: int = 20_000
    # run on a server whose maxmemory-policy may evict keys (refused otherwise)
    allow_eviction: bool = False
    # --batch-timeout: seconds the flow may run on one event of a batch before it is stopped
    batch_timeout: float = 60.0
    # --follow: keep reading the input as it grows, until interrupted
    follow: bool = False
    # redis-stream:KEY input: the entries' field holding the event, and the Redis the stream
    # lives on (None: the pipeline's)
    source_field: str = DEFAULT_SOURCE_FIELD
    source_url: str | None = None
    # --metrics-port: where this command serves Prometheus metrics (None: it does not)
    metrics: Address | None = None

    @property
    def worker_count(self) -> int:
        """How many worker processes the command starts itself."""
        if self.workers is not None:
            return self.workers
        return 0 if self.redis_url else DEFAULT_EMBEDDED_WORKERS


SECRET_PARAMETER = re.compile(r"(^|[?&;])([^=&;]*password[^=&;]*)=([^&;#]*)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL without its passwords (userinfo, ``?password=``, ``?sentinel_password=``...).

    Works on the text, not on a parsed URL: a sentinel URL's netloc
    (``host:port,host:port``) is not one that ``urlsplit`` can give a port of,
    and a password with a ``/`` in it must not end the userinfo early.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, question, query = rest.partition("?")
    userinfo, at, after = head.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        userinfo = f"{user}:***" if user else "***"
    if question:
        query = SECRET_PARAMETER.sub(lambda m: f"{m[1]}{m[2]}=***", query)
    return f"{scheme}://{userinfo}{at}{after}{question}{query}"


def url_secrets(url: str) -> list[str]:
    """The passwords a URL holds, as written in it and percent-decoded, longest first."""
    found: list[str] = []
    head, _, query = url.partition("://")[2].partition("?")
    userinfo, at, _ = head.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    found += [m[3] for m in SECRET_PARAMETER.finditer(query)]
    secrets = {s for raw in found for s in (raw, unquote(raw), unquote_plus(raw)) if s}
    return sorted(secrets, key=len, reverse=True)


def redact_text(text: str, url: str) -> str:
    """``text`` with every password of ``url`` replaced by ``***`` (for error messages)."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text
