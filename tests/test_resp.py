"""Commands packed at once (tasks/resp.py): the bytes redis-py would send, and the same replies."""

import pytest
import redis
from redis.exceptions import DataError

from orchestrator.server import client_for
from tasks.keys import Keys
from tasks.resp import PackingAware, packed, send, takes_packed

ARGS = [
    ("HSET", "ns:{ns-p0}:state", "u1", b'{"a":[1]}', "ü-é", b"", "k", 7),
    ("HMGET", "ns:{ns-p0}:state", "u1", "ü-é", "missing"),
    ("SET", "k", b"\x00\r\n$3\r\n"),  # bytes that look like the protocol stay bytes
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a[0])
def test_a_packed_command_is_the_bytes_redis_py_would_send(args):
    default = redis.Connection().pack_command  # how a connection packs by default
    assert packed(*args).resp == b"".join(default(*args))
    assert PackingAware().pack(*args) == default(*args)
    assert PackingAware().pack(packed(*args)) == [packed(*args).resp]


def test_arguments_redis_py_refuses_are_refused_the_same_way():
    for bad in (None, True, 1.5j):
        with pytest.raises(DataError):
            packed("SET", "k", bad)
        with pytest.raises(DataError):
            PackingAware().pack("SET", "k", bad)
    with pytest.raises(UnicodeEncodeError):
        packed("SET", "k", "\ud800")  # a lone surrogate: not UTF-8
    with pytest.raises(UnicodeEncodeError):
        PackingAware().pack("SET", "k", "\ud800")


def test_only_clients_that_send_packed_commands_get_them(fake, redis_url):
    client = client_for(redis_url)
    try:
        assert takes_packed(client)
        assert takes_packed(client.pipeline())
    finally:
        client.close()
    assert not takes_packed(fake)
    assert not takes_packed(redis.Redis.from_url(redis_url))


def test_a_url_that_sets_redis_pys_encoding_gets_no_packed_commands(redis_url):
    # (packed commands are UTF-8: a key must be encoded alike by every command naming it)
    joiner = "&" if "?" in redis_url else "?"
    for option in ("encoding=latin-1", "encoding_errors=replace"):
        client = client_for(f"{redis_url}{joiner}{option}")
        try:
            assert not takes_packed(client)
            assert client.ping()
        finally:
            client.close()


def test_the_packed_knob_switched_off_leaves_every_command_to_redis_py(redis_url, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_TUNING", "-packed")
    client = client_for(redis_url)
    try:
        assert not takes_packed(client)
    finally:
        client.close()


def test_packed_commands_in_a_transaction_get_the_replies_plain_ones_get(
    fake, redis_url, namespace
):
    client = client_for(redis_url)
    plain = redis.Redis.from_url(redis_url)
    try:
        keys = Keys(namespace)
        for partition, r in enumerate((client, plain, fake)):
            fast = takes_packed(r)
            state = keys.state(partition)
            with r.pipeline(transaction=True) as pipe:
                pipe.watch(state)
                pipe.multi()
                send(pipe, fast, "HSET", state, "u1", b"[1]", "ü", b"[]")
                pipe.hset(keys.progress(partition), "applied", 1)
                assert pipe.execute() == [2, 1]
            with r.pipeline(transaction=False) as reads:
                send(reads, fast, "HMGET", state, "ü", "u1", "none")
                assert reads.execute() == [[b"[]", b"[1]", None]]
    finally:
        client.close()
        plain.close()
