"""Where ``run_main`` keeps its state: ``RedisRecoveryConfig``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.server import URL_SCHEMES
from orchestrator.settings import Settings
from tasks.keys import Keys


@dataclass(frozen=True)
class RedisRecoveryConfig:
    """Keep a flow's state and progress in Redis, so that a later run can resume it.

    Args:
        location: a ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URL
            (see ``orchestrator.sentinel``), or a directory
            for the embedded redis-server (created if missing; the data persists there).
        namespace: the namespace of the flow's keys in that Redis.
        allow_eviction: run even if the server's maxmemory-policy may evict keys
            (refused by default: an evicted state is lost silently).
        first_epoch: the epoch a new namespace's first run may start at. A namespace with
            no record of earlier runs whose input starts after it is refused: a Redis that
            lost everything (restarted empty, say) looks just like that, and going on from
            an empty state would give wrong outputs.
    """

    location: str | os.PathLike[str]
    namespace: str = "run-main"
    allow_eviction: bool = False
    first_epoch: int = 0

    def __post_init__(self) -> None:
        Keys(self.namespace)  # a bad namespace fails here, not mid-run
        if not isinstance(self.first_epoch, int) or isinstance(self.first_epoch, bool):
            msg = f"first_epoch must be an int, got {self.first_epoch!r:.60}"
            raise TypeError(msg)

    @property
    def url(self) -> str | None:
        """The Redis URL, or None for the embedded server."""
        text = os.fspath(self.location)
        return text if text.startswith(URL_SCHEMES) else None

    def settings(self) -> Settings:
        """The settings that reach this Redis."""
        if self.url is not None:
            return Settings(redis_url=self.url, namespace=self.namespace)
        return Settings(data_dir=Path(self.location), namespace=self.namespace)
