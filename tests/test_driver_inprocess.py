"""The driver in-process on fakeredis, with RQ's own worker run in burst mode between its reads.

No process and no server: the whole run (planning, claiming partitions, batches
as real RQ jobs, the workers' commits, notices, the output file, the committed
record) in a fraction of a second, for a fast inner loop. The integration
tests run the same code through the CLI on a real redis-server.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from rq.serializers import JSONSerializer

from bench.generate import generate
from orchestrator import interrupts
from orchestrator.commands import drive
from orchestrator.lock import DriverLock
from orchestrator.namespace import Committer, read_info
from orchestrator.server import AnnouncedRetry
from orchestrator.settings import Settings
from tasks.keys import Keys
from tasks.rqcompat import LeanWorker, partition_queues

from conftest import SEED_INPUT, new_namespace
from helpers import states_in
from reference import reference_run


class BurstWorkers:
    """Housekeeping that runs every queued batch job at once, in this process: an RQ
    SimpleWorker in burst mode, so that the driver's batches commit between two reads."""

    def __init__(self, r, keys: Keys, partitions: int) -> None:
        self.r, self.keys, self.queues = r, keys, partition_queues(r, keys, partitions)
        self.runs = 0

    def between_reads(self) -> None:
        worker = LeanWorker(self.queues, connection=self.r, serializer=JSONSerializer)
        # RQ's worker installs its SIGINT/SIGTERM handlers: the test process gets its own back.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if worker.work(burst=True, logging_level="WARNING"):
                self.runs += 1
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def batches_wait(self) -> None:
        # (called once a batch has been in flight for WAITING_NOTE_AFTER: on a loaded
        # machine a burst run alone may take that long, but it leaves no job queued or staged)
        queued = [queue.name for queue in self.queues if queue.count]
        staged = list(self.r.scan_iter(match=self.keys.successors_pattern))
        assert not queued and not staged, (
            f"batches waited ({queued}, {staged}): burst workers run them all at once"
        )


def run(fake, settings: Settings, mode: str, path: Path, from_epoch: int | None = None):
    keys = Keys(settings.namespace)
    workers: list[BurstWorkers] = []

    def housekeeping(keys: Keys, partitions: int) -> BurstWorkers:
        workers.append(BurstWorkers(fake, keys, partitions))
        return workers[-1]

    with open(path, "rb") as f, DriverLock(fake, keys) as lock:
        result = drive(settings, mode, path, from_epoch, f, fake, True, housekeeping, lock)
    assert workers[0].runs > 0
    return result


@pytest.fixture
def events(tmp_path):
    lines = list(generate(3_000, 200, seed=7))
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_an_ingest_gives_the_plain_loops_output_and_states(fake, tmp_path, events):
    path, lines = events
    settings = Settings(
        namespace="inproc", partitions=3, batch_events=200, output=tmp_path / "out.txt"
    )
    result = run(fake, settings, "ingest", path)

    expected_output, expected_states = reference_run(lines)
    assert result.committed == len(lines) - 1
    assert (tmp_path / "out.txt").read_text() == expected_output
    assert states_in(fake, "inproc") == expected_states
    assert read_info(fake, Keys("inproc")).committed == len(lines) - 1


def test_a_replay_from_an_epoch_gives_the_same_file(fake, tmp_path, events):
    path, lines = events
    settings = Settings(
        namespace="inproc", partitions=2, batch_events=150, output=tmp_path / "out.txt"
    )
    run(fake, settings, "ingest", path)
    first = (tmp_path / "out.txt").read_text()

    run(fake, settings, "replay", path, from_epoch=1_234)

    assert (tmp_path / "out.txt").read_text() == first


def test_the_seeds_bad_line_stops_the_run_after_everything_before_it(fake, tmp_path):
    settings = Settings(namespace="seed", partitions=2, output=tmp_path / "out.txt")
    result = run(fake, settings, "ingest", SEED_INPUT)
    assert result.failure is not None and result.failure.epoch == 5
    assert result.committed == 4
    assert (tmp_path / "out.txt").read_text().splitlines()[-1].startswith("4 ")


@pytest.fixture
def interrupts_installed():
    """The commands' Ctrl-C handler in this process; pytest's own back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    gave_up = AnnouncedRetry.give_up
    interrupts.install()
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    AnnouncedRetry.give_up = gave_up
    interrupts.HELD.pending = False


@pytest.mark.parametrize("where", ["fakeredis", "redis-server"])
def test_a_ctrl_c_while_lines_are_recorded_leaves_them_recorded(
    where, request, tmp_path, events, monkeypatch, interrupts_installed
):
    r = request.getfixturevalue("fake" if where == "fakeredis" else "real")
    path, lines = events
    ns = new_namespace()
    settings = Settings(namespace=ns, partitions=3, batch_events=200, output=tmp_path / "out.txt")
    record, cut = Committer.record, []

    def ctrl_c_during_the_record(self, committed, *args, **kwargs):
        if committed >= 1_000 and not cut:
            cut.append(committed)
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, before the record's script
        return record(self, committed, *args, **kwargs)

    monkeypatch.setattr(Committer, "record", ctrl_c_during_the_record)
    with pytest.raises(KeyboardInterrupt):
        run(r, settings, "ingest", path)
    monkeypatch.setattr(Committer, "record", record)

    # The record went through and the interrupted run recorded every line it wrote.
    written = (tmp_path / "out.txt").read_text()
    assert read_info(r, Keys(ns)).committed == cut[0]
    assert int(written.splitlines()[-1].split()[0]) == cut[0]
    run(r, settings, "resume", path)
    expected_output, expected_states = reference_run(lines)
    assert (tmp_path / "out.txt").read_text() == expected_output
    assert states_in(r, ns) == expected_states
