"""Every key one partition's commit touches is in one Redis Cluster slot (its hash tag).

A real batch job's commands (the lease and batch fetch, the WATCH and reads, the MULTI/EXEC
with the LMOVE of the staged successor into the RQ queue and the notice) are recorded on
their way to a real redis-server, which names each command's keys (COMMAND GETKEYS); the
slot of each key is computed as Redis Cluster does: CRC16 (XMODEM) of the key, or of its
hash tag (the part between the first ``{`` and the next ``}``, if not empty), modulo 16384.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.connection import Connection

from tasks.batch import Batch
from tasks.cartjoin import FLOW_PATH
from tasks.jobs import run_batch
from tasks.keys import SLOTS
from tasks.lease import partition_lease
from tasks.resp import PackedCommand
from tasks.store import claim_partition

pytestmark = pytest.mark.integration

CLUSTER_SLOTS = 16384


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: bytes) -> int:
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % CLUSTER_SLOTS


def test_the_slot_function_is_redis_clusters():
    assert crc16(b"123456789") == 0x31C3  # CRC-16/XMODEM's published check value
    assert cluster_slot(b"{user1000}.following") == cluster_slot(b"{user1000}.followers")
    assert cluster_slot(b"foo{}{bar}") == crc16(b"foo{}{bar}") % CLUSTER_SLOTS  # empty tag
    assert cluster_slot(b"foo{{bar}}zap") == crc16(b"{bar") % CLUSTER_SLOTS


def recording_client(real: redis.Redis) -> tuple[redis.Redis, list[tuple[Any, ...]]]:
    """A client of the same server that records every command it sends."""
    sent: list[tuple[Any, ...]] = []
    base: type[Connection] = real.connection_pool.connection_class

    class Recording(base):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> Any:
            sent.append(args[0].args if type(args[0]) is PackedCommand else args)
            return super().pack_command(*args)

        def pack_commands(self, commands: Any) -> Any:
            # (a command packed at once: tasks/resp.py)
            sent.extend(c[0].args if type(c[0]) is PackedCommand else tuple(c) for c in commands)
            return super().pack_commands(commands)

    pool = redis.ConnectionPool(
        connection_class=Recording, **real.connection_pool.connection_kwargs
    )
    return redis.Redis(connection_pool=pool), sent


def command_keys(real: redis.Redis, command: tuple[Any, ...]) -> list[bytes]:
    try:
        found = real.command_getkeys(*command)
        return [key if isinstance(key, bytes) else key.encode() for key in found]
    except redis.ResponseError:  # a command without keys (MULTI, EXEC, CLIENT ...)
        return []


@pytest.mark.parametrize("partition", [0, 3])
def test_every_key_a_partitions_commit_touches_is_in_one_cluster_slot(real, keys, partition):
    generation, partitions = 5, 4
    claim_partition(real, keys, partition, generation)
    lines = [
        b'{"user_id": "%s", "type": "order", "order_id": %d}' % (user.encode(), i)
        for i, user in enumerate(["a", "b", "c", "d", "e", "f", "g", "h"])
    ]
    batch = Batch(
        keys.namespace, generation, partition, partitions, -1, len(lines) - 1, FLOW_PATH,
        "fail", list(range(len(lines))), lines, slots=SLOTS,
    )  # fmt: skip
    batch_key = keys.batch(generation, partition, batch.last_epoch)
    real.set(batch_key, batch.encode())
    real.rpush(keys.successor(generation, partition), "the-next-job")
    client, sent = recording_client(real)
    try:
        job_id = keys.job_id(generation, partition, batch.last_epoch)
        with partition_lease(client, keys.lease(partition), job_id, fetch=batch_key) as lease:
            assert lease.fetched is not None
            result = run_batch(client, Batch.decode(lease.fetched), lease=lease)
    finally:
        client.close()
    assert result["outcome"] == "committed"

    touched = {key for command in sent for key in command_keys(real, command)}
    expected = {
        keys.lease(partition), batch_key, keys.progress(partition), keys.state(partition),
        keys.undo(partition), keys.successor(generation, partition),
        keys.queue_key(partition), keys.notices(generation, partition),
    }  # fmt: skip
    assert {key.decode() for key in touched} >= expected
    assert {cluster_slot(key) for key in touched} == {cluster_slot(keys.state(partition).encode())}
