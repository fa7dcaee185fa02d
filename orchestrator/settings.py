"""The settings of one command, built once from flags and environment at the CLI edge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from tasks.batch import OnError

DEFAULT_NAMESPACE = "cart-join"
DEFAULT_DATA_DIR = Path(".orchestrator")
DEFAULT_PARTITIONS = 4
DEFAULT_EMBEDDED_WORKERS = 2
DEFAULT_FLOW = "tasks.cartjoin:flow"

Mode = Literal["ingest", "resume", "replay"]


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
    # None: the namespace's stored flow, or the cart join for a new namespace
    flow: str | None = None
    verbose: bool = False
    quiet: bool = False
    retain_epochs: int = 100_000
    max_line_bytes: int = 1 << 20
    batch_events: int = 20_000
    # run on a server whose maxmemory-policy may evict keys (refused otherwise)
    allow_eviction: bool = False
    # --batch-timeout: seconds the flow may run on one event of a batch before it is stopped
    batch_timeout: float = 60.0

    @property
    def worker_count(self) -> int:
        """How many worker processes the command starts itself."""
        if self.workers is not None:
            return self.workers
        return 0 if self.redis_url else DEFAULT_EMBEDDED_WORKERS


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))
