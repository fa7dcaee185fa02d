"""Helpers for tests that run the pipeline several times and check what it committed."""

from __future__ import annotations

import orjson
import psutil
import redis

from tasks.keys import Keys


def committed_states(url: str, namespace: str) -> dict[str, object]:
    """Every key's committed state in a namespace, across its partitions."""
    client = redis.Redis.from_url(url)
    try:
        return states_in(client, namespace)
    finally:
        client.close()


def states_in(client: redis.Redis, namespace: str) -> dict[str, object]:
    """Every key's committed state in a namespace, read with ``client``."""
    keys = Keys(namespace)
    partitions = int(client.hget(keys.meta, "partitions"))
    states: dict[str, object] = {}
    for p in range(partitions):
        for key, value in client.hgetall(keys.state(p)).items():
            states[key.decode()] = orjson.loads(value)
    return states


def merge_outputs(*outputs: str) -> str:
    """The output of several runs over one input, one line per epoch, in epoch order.

    A crash can print an epoch's line twice (stdout is at-least-once); both
    copies must be the same line.
    """
    by_epoch: dict[int, str] = {}
    for text in outputs:
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # a line cut by a SIGKILL mid-write; its epoch is printed again later
            epoch = int(line.split(" ", 1)[0])
            assert by_epoch.setdefault(epoch, line) == line, f"epoch {epoch} printed differently"
    return "".join(by_epoch[e] for e in sorted(by_epoch))


def committed_epoch(url: str, namespace: str) -> int:
    """The namespace's recorded committed epoch; -1 if none, or if Redis cannot be reached."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.hget(Keys(namespace).meta, "committed") or -1)
    except redis.RedisError:
        return -1
    finally:
        client.close()


def servers_in(data_dir) -> list[int]:
    """The pids of the redis-servers running in ``data_dir`` (an embedded server's directory)."""
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        try:
            if "redis-server" in (proc.info["name"] or "") and proc.info["cwd"] == str(data_dir):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def keepers_of(data_dir) -> list[int]:
    """The pids of the keeper processes running the embedded server of ``data_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "orchestrator.keeper" in cmdline and str(data_dir) in cmdline:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found
