"""Commands with an argument per event, packed into Redis's protocol in one C call.

redis-py packs a command's arguments one by one in Python: for a batch's
HSET of its states and HMGET of its keys that was ~0.9 and ~0.55 us per event
of a worker's CPU, against ~0.2 and ~0.1 us for one ``hiredis.pack_command``
of the same arguments (docs/performance.md). ``packed`` makes such a command;
a client from ``orchestrator.server.client_for`` sends it as it is, through
``PackingAware``, its connections' packer. A client without that packer (a
fakeredis one, one a test made) gets the same command with its arguments, as
``send`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hiredis
import redis
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import DataError

Arg = str | bytes | int


class PackedCommand(str):
    """A command's name (as redis-py sees it, for its reply callbacks) with the whole
    command, already in Redis's protocol, in ``resp`` (and as arguments in ``args``)."""

    resp: bytes
    args: tuple[Arg, ...]


def packed(*args: Arg) -> PackedCommand:
    """The command ``args`` (its name first), packed.

    Raises:
        DataError: an argument that is none of str, bytes and int, as redis-py says it.
        UnicodeEncodeError: a str that UTF-8 cannot encode, as redis-py raises it.
    """
    command = PackedCommand(args[0])
    command.args = args
    try:
        # (hiredis's stub types the tuple as having one item)
        command.resp = hiredis.pack_command(args)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(str(e)) from None
    return command


class PackingAware:
    """redis-py's command packer for a connection, which sends a PackedCommand as it is.

    Every other command is packed as redis-py packs it by default (UTF-8, strict),
    which is what ``client_for``'s clients use.
    """

    def __init__(self) -> None:
        # How a connection packs by default (redis-py's choice of packer differs between
        # versions); a Connection object connects only when it is used.
        self._default: Callable[..., list[bytes]] = redis.Connection().pack_command

    def pack(self, *args: Any) -> list[bytes]:
        if type(args[0]) is PackedCommand:
            return [args[0].resp]
        return self._default(*args)


def takes_packed(r: Redis | Pipeline) -> bool:
    """Whether ``r``'s connections send a PackedCommand as it is."""
    pool = getattr(r, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    return isinstance(kwargs.get("command_packer"), PackingAware)


def send(r: Redis | Pipeline, fast: bool, *args: Arg) -> Any:
    """Run (or, on a pipeline, queue) the command ``args``: packed at once if ``fast``
    (``takes_packed(r)``), else argument by argument, as redis-py does."""
    if fast:
        return r.execute_command(packed(*args))  # type: ignore[no-untyped-call]
    return r.execute_command(*args)  # type: ignore[no-untyped-call]
