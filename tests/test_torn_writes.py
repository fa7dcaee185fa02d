"""A Redis that holds part of a transaction: refused, never built on.

Redis (6.2 and 7) whose append-only file was cut inside a MULTI/EXEC block (a crash)
truncates the file there at its next start, leaving the block's MULTI and first commands
in it; after a transaction of any client, the next start runs those commands with it.
A partition can then hold states of a batch without its progress, and a resume would
apply that batch again on top of them. Every transaction that writes a partition or
meta marks itself whole (``tasks/store.py`` TORN); a part of one is refused, exit 3.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import redis
from test_driver_inprocess import run
from test_redis_lost_data import aof_path, one_line_error

from bench.generate import generate
from orchestrator.namespace import Committer
from orchestrator.queries import state_of
from orchestrator.settings import Settings
from tasks.errors import TornWrite
from tasks.keys import Keys
from tasks.store import TORN, applied_epochs, partition_transaction, restore_partition

from conftest import REPO, RedisServer, new_namespace, run_cli
from helpers import committed_states
from reference import reference_run

# ------------------------------------------------------------------ the append-only file


def aof_commands(path: str) -> list[tuple[int, int, list[bytes]]]:
    """The commands of an append-only file without an RDB preamble: (start, end, argv)."""
    with open(path, "rb") as f:
        data = f.read()
    assert not data.startswith(b"REDIS"), "a rewritten file: the test's run is too long"
    commands, at = [], 0
    while at < len(data):
        start = at
        end = data.index(b"\r\n", at)
        argc, at = int(data[at + 1 : end]), end + 2
        argv = []
        for _ in range(argc):
            end = data.index(b"\r\n", at)
            size = int(data[at + 1 : end])
            argv.append(data[end + 2 : end + 2 + size])
            at = end + 2 + size + 2
        commands.append((start, at, argv))
    return commands


def transactions(commands):
    """The MULTI/EXEC blocks: the commands between each MULTI and its EXEC."""
    blocks, block = [], None
    for command in commands:
        name = command[2][0].upper()
        if name == b"MULTI":
            block = []
        elif name == b"EXEC":
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(command)
    return blocks


def marked_whole(block, key: bytes) -> bool:
    first, last = block[0][2], block[-1][2]
    return first == [b"HINCRBY", key, TORN.encode(), b"1"] and last == [
        b"HINCRBY",
        key,
        TORN.encode(),
        b"-1",
    ]


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def own_server():
    directory = tempfile.mkdtemp(prefix="orchestrator-torn-")
    server = RedisServer(directory).start()
    yield server
    server.stop()


@pytest.fixture
def events(tmp_path):
    lines = list(generate(3_000, 200, seed=44))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def run_args(url, ns):
    return ["--redis-url", url, "--namespace", ns, "--workers", "2", "--batch-events", "200"]


# ------------------------------------------------------------------ the tests


@pytest.mark.integration
def test_every_transaction_on_a_partition_or_meta_is_marked_whole_at_both_ends(
    own_server, events, tmp_path
):
    path, _ = events
    ns, out = new_namespace(), tmp_path / "out.txt"
    args = [*run_args(own_server.url, ns), "--output", str(out)]
    assert run_cli("ingest", str(path), *args, "--partitions", "2", cwd=REPO).returncode == 0
    # a resume that restores and rescales, and a replay that restores every partition
    assert run_cli("resume", str(path), *args, "--partitions", "3", cwd=REPO).returncode == 0
    replay = run_cli("replay", str(path), *args, "--from-epoch", "1000", cwd=REPO)
    assert replay.returncode == 0, replay.stderr

    keys = [Keys(ns, tagged=True)]
    meta = keys[0].meta.encode()
    guarded = {meta} | {k.encode() for p in range(3) for k in (keys[0].progress(p),)}
    state_keys = {k.encode() for p in range(3) for k in (keys[0].state(p), keys[0].undo(p))}
    kinds = set()
    for block in transactions(aof_commands(aof_path(own_server.directory))):
        written = {argv[1] for _, _, argv in block if len(argv) > 1}
        touched = written & (guarded | state_keys)
        if not touched:
            continue  # RQ's, the lock's, the batches'
        marker = block[0][2][1]
        assert marker in guarded and marked_whole(block, marker), [argv[:2] for _, _, argv in block]
        kinds.add("meta" if marker == meta else "partition")
    assert kinds == {"meta", "partition"}


@pytest.mark.integration
def test_a_partition_that_holds_part_of_a_commit_is_refused(own_server, events, tmp_path):
    """The crash, the two restarts and a transaction of another client between them, on a
    real server: the resume after them refuses, exit 3, and writes nothing."""
    path, lines = events
    ns, out = new_namespace(), tmp_path / "out.txt"
    url = own_server.url
    args = [*run_args(url, ns), "--output", str(out)]
    ingest = run_cli("ingest", str(path), *args, "--partitions", "2", cwd=REPO)
    assert ingest.returncode == 0, ingest.stderr

    # The crash: the file ends inside the last commit of a batch, just after its states.
    own_server.kill()
    aof = aof_path(own_server.directory)
    commands = aof_commands(aof)
    state_keys = {Keys(ns, tagged=True).state(p).encode() for p in range(2)}
    last = max(
        i for i, (_, _, argv) in enumerate(commands)
        if argv[0].upper() == b"HSET" and argv[1] in state_keys
    )  # fmt: skip
    _, cut, states = commands[last]
    applied_by_cut = next(
        argv[3] for _, _, argv in commands[last:]
        if argv[0].upper() == b"HSET" and argv[2:3] == [b"applied"]
    )  # fmt: skip
    os.truncate(aof, cut + 3)  # (3 bytes into the command after it)
    own_server.start()  # Redis truncates the file inside the block, keeping its start
    other = redis.Redis.from_url(url)
    other.pipeline(transaction=True).set(f"{ns}-other-client", 1).execute()
    other.close()
    own_server.kill()
    own_server.start()  # Redis runs the block's start with the other client's transaction

    client = redis.Redis.from_url(url)
    # The partition holds the cut commit's states, but not the progress it would have set.
    state_key, fields = states[1], dict(zip(states[2::2], states[3::2], strict=True))
    assert client.hmget(state_key, list(fields)) == list(fields.values())
    [cut_partition] = [p for p in range(2) if Keys(ns).state(p).encode() == state_key]
    assert client.hget(Keys(ns).progress(cut_partition), "applied") != applied_by_cut
    with pytest.raises(TornWrite):
        applied_epochs(client, Keys(ns, tagged=True), 2)
    key = next(iter(fields)).decode()
    shown = run_cli("state", key, "--redis-url", url, "--namespace", ns, cwd=REPO)
    assert shown.returncode == 3, shown.stderr
    before = client.hgetall(Keys(ns).meta)
    resumed = run_cli("resume", str(path), *args, cwd=REPO)
    assert resumed.returncode == 3, resumed.stderr
    one_line_error(resumed.stderr, "Redis holds part of a transaction", "reset")
    assert client.hgetall(Keys(ns).meta) == before

    # Starting over gives the exact result.
    reset = run_cli("reset", "--redis-url", url, "--namespace", ns, "--yes", cwd=REPO)
    assert reset.returncode == 0, reset.stderr
    again = run_cli("ingest", str(path), *args, cwd=REPO)
    assert again.returncode == 0, again.stderr
    expected_out, expected_states = reference_run(lines)
    assert out.read_text() == expected_out
    assert committed_states(url, ns) == expected_states
    client.close()


# ------------------------------------------------------------------ on fakeredis: every reader


def test_a_commit_and_a_restore_leave_their_partition_whole(fake, events, tmp_path):
    path, _ = events
    settings = Settings(namespace="whole", partitions=2, batch_events=300)
    run(fake, settings, "ingest", path)
    run(fake, settings, "replay", path, from_epoch=1_000)  # (restores every partition)
    keys = Keys("whole")
    assert [fake.hget(keys.progress(p), TORN) for p in range(2)] == [b"0", b"0"]
    assert fake.hget(keys.meta, TORN) == b"0"


@pytest.mark.parametrize("torn", ["meta", "partition 1"])
def test_a_resume_on_a_namespace_that_holds_part_of_a_transaction_writes_nothing(
    fake, events, torn
):
    path, _ = events
    settings = Settings(namespace="torn", partitions=2, batch_events=300)
    run(fake, settings, "ingest", path)
    keys = Keys("torn")
    fake.hincrby(keys.meta if torn == "meta" else keys.progress(1), TORN, 1)
    before = {k: fake.dump(k) for k in fake.keys("torn:*")}
    with pytest.raises(TornWrite, match="Redis holds part of a transaction"):
        run(fake, settings, "replay", path, from_epoch=500)
    assert {k: fake.dump(k) for k in fake.keys("torn:*")} == before
    with pytest.raises(TornWrite):
        state_of(fake, keys, "u1", None)


def test_a_partition_torn_during_a_run_stops_it_at_the_next_record(
    fake, events, monkeypatch, tmp_path
):
    path, _ = events
    settings = Settings(namespace="midrun", partitions=2, batch_events=300)
    record = Committer.record

    def torn_before_the_record(self, committed, *args, **kwargs):
        fake.hincrby(Keys("midrun").progress(0), TORN, 1)  # (Redis ran part of a commit)
        return record(self, committed, *args, **kwargs)

    monkeypatch.setattr(Committer, "record", torn_before_the_record)
    with pytest.raises(TornWrite, match="partition 0's progress"):
        run(fake, settings, "ingest", path)


def test_a_torn_partition_refuses_a_restore_and_a_batch(fake):
    keys = Keys("direct")
    fake.hset(keys.progress(0), mapping={"generation": 5, "applied": 10, TORN: 1})
    with pytest.raises(TornWrite):
        restore_partition(fake, keys, 0, 3, generation=5)
    with pytest.raises(TornWrite), partition_transaction(fake, keys, 0) as txn:
        txn.load(["u1"])
