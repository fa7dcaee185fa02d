"""The Lua scripts, loaded once from ``tasks/lua/`` and called through typed wrappers."""

from __future__ import annotations

import enum
from functools import cache
from importlib import resources
from typing import Any

from redis import Redis
from redis.commands.core import Script


class CommitOutcome(enum.IntEnum):
    """What the commit script did with a batch."""

    COMMITTED = 1
    DUPLICATE = 0  # the partition had applied this batch already: nothing written
    STALE = -1  # a newer driver run owns the namespace: nothing written
    OUT_OF_ORDER = -2  # the batch before this one is not committed yet: nothing written


@cache
def _source(name: str) -> str:
    return resources.files("tasks").joinpath("lua", f"{name}.lua").read_text()


@cache
def _script(name: str) -> Script:
    # Given as bytes, a Script needs no client to hash itself; every call passes its client.
    return Script(None, _source(name).encode())  # type: ignore[arg-type]


def commit_batch(client: Redis, keys: list[str], args: list[Any]) -> CommitOutcome:
    """Run ``commit_batch.lua`` (see its header for KEYS and ARGV)."""
    return CommitOutcome(int(_script("commit_batch")(keys=keys, args=args, client=client)))
