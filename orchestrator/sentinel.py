"""Redis Sentinel: the ``redis+sentinel://`` URL, and a client of the primary it names.

``redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[?OPTIONS]``

- ``HOST:PORT`` are sentinels (port 26379 if left out), asked in turn;
- ``SERVICE`` is the name the sentinels monitor the primary under;
- the userinfo (or ``?password=``/``?username=``) authenticates with the primary;
- ``?db=N`` selects the database, ``?sentinel_password=`` (and
  ``?sentinel_username=``) authenticate with the sentinels.

The client is redis-py's ``Sentinel(...).master_for(SERVICE)``: its connections
ask the sentinels for the primary's address every time they connect, and a
primary demoted to a replica (``READONLY``) is treated as a lost connection.
With the retry of ``orchestrator.server`` (which reconnects until its deadline),
and ``FollowingConnection`` (which asks the sentinels at every reconnect, also
in the middle of a command), every client of the driver and the workers
follows a failover to the promoted replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection
from redis.utils import SENTINEL

SCHEME = "redis+sentinel"
DEFAULT_PORT = 26379
OPTIONS = ("db", "username", "password", "sentinel_username", "sentinel_password")


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a primary through sentinels."""
    return url.lower().startswith(SCHEME + "://")


@dataclass(frozen=True)
class SentinelAddress:
    """What a ``redis+sentinel://`` URL says."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Parse a ``redis+sentinel://`` URL (format in the module's docstring).

    Raises:
        ValueError: a missing service name or sentinel, a bad port or db, an unknown option
            (the message never holds a password).
    """
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    userinfo, at, rest = rest.rpartition("@")
    hosts, _, service = rest.partition("/")
    service = unquote(service.strip("/"))
    if not service or "/" in service:
        msg = "a sentinel URL names one service: redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE"
        raise ValueError(msg)
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        msg = f"unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})"
        raise ValueError(msg)
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    try:
        db = int(options.get("db", "0"))
    except ValueError:
        raise ValueError(f"db must be a whole number: {options['db']!r}") from None
    return SentinelAddress(
        sentinels=tuple(_host_port(h) for h in hosts.split(",")),
        service=service,
        db=db,
        username=options.get("username") or username,
        password=options.get("password") or password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def _host_port(text: str) -> tuple[str, int]:
    if not text:
        raise ValueError("a sentinel URL needs at least one HOST[:PORT]")
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad sentinel port in {text!r}") from None
    if not host or not 0 < number < 65536:
        raise ValueError(f"bad sentinel address {text!r}")
    return host, number


class ConciseSentinel(Sentinel):
    """redis-py's Sentinel, whose "no primary" error fits on one line.

    redis-py's message holds the full repr of every sentinel client (hundreds
    of characters each); this one names the sentinels and why each failed.
    """

    def __init__(self, sentinels: list[tuple[str, int]], **kwargs: Any) -> None:
        # redis-py's Sentinel is unannotated before 8.2 (strict mypy refuses such calls), and
        # annotated since (a type: ignore would be unused): cast(Any) passes on both
        cast(Any, super()).__init__(sentinels, **kwargs)

    def discover_master(self, service_name: str) -> Any:
        try:
            return cast(Any, super()).discover_master(service_name)  # (see __init__)
        except MasterNotFoundError as e:
            reasons = sorted(set(re.findall(r" - (\w+:\w+)", str(e))))
            why = (
                f"sentinel errors: {', '.join(reasons)}"
                if reasons
                else "the sentinels know no live primary"
            )
            where = ",".join(
                f"{c.connection_pool.connection_kwargs.get('host')}:"
                f"{c.connection_pool.connection_kwargs.get('port')}"
                for c in self.sentinels
            )
            msg = f"no sentinel at {where} names a primary for {service_name!r} ({why})"
            raise MasterNotFoundError(msg) from None


class FollowingConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is at every socket it opens.

    redis-py (8.1) asks them only in ``connect()``, which a connection pool
    calls when it hands a connection out; a connection that drops during a
    command reconnects through ``connect_check_health`` instead (from
    ``send_packed_command``), to the host it had, so the retries of a running
    command would knock on the dead primary until they give up (a run whose
    primary was killed exited 3 at its deadline, every retry on the old address,
    long after the sentinel had promoted the replica).
    """

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()  # type: ignore[no-untyped-call]

    def read_response(
        self,
        disable_decoding: bool = False,
        *,
        timeout: Any = SENTINEL,
        disconnect_on_error: bool | None = True,
        push_request: bool | None = False,
    ) -> Any:
        """Read a reply; a read cut short drops the connection, as for a plain connection.

        redis-py's sentinel connection defaults to keeping it, so an RQ worker
        stopped by SIGTERM in its BLPOP (RQ raises from the signal handler) went
        back to the pool with the BLPOP's reply still to come, and the worker's
        last transaction read it as its own ("Wrong number of response items
        from pipeline execution", at the end of every run with a sentinel URL).
        """
        return super().read_response(
            disable_decoding,
            timeout=timeout,
            disconnect_on_error=disconnect_on_error,
            push_request=push_request,
        )


def sentinel_client(address: SentinelAddress, **kwargs: Any) -> Redis:
    """A client of the service's primary; ``kwargs`` are the primary's connection options.

    The sentinels themselves are asked without retries and with the same
    timeouts: ``discover_master`` goes on to the next sentinel when one does
    not answer, and the primary's retry asks them all again.
    """
    sentinel_kwargs: dict[str, Any] = {
        k: v for k, v in kwargs.items() if k.startswith("socket_") or k == "decode_responses"
    }
    sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)
    if address.sentinel_password is not None:
        sentinel_kwargs["password"] = address.sentinel_password
        sentinel_kwargs["username"] = address.sentinel_username
    sentinel = ConciseSentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs)
    primary: Redis = cast(Any, sentinel).master_for(
        address.service,
        db=address.db,
        username=address.username,
        password=address.password,
        connection_class=FollowingConnection,
        **kwargs,
    )
    return primary
