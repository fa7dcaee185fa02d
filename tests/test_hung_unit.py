"""A flow that hangs on one event, or kills its worker: stopped, isolated, reported (no CLI)."""

import re
import signal
import subprocess
import sys
import time

import orjson
import pytest
from test_store import batch, start

from tasks.apply import apply_events
from tasks.batch import Batch, CommitNotice, Rejection
from tasks.careful import CarefulRun
from tasks.flow import Dataflow
from tasks.jobs import batch_events, run_batch
from tasks.keys import Keys
from tasks.watchdog import EventWatch

from conftest import REPO

HANG, REGEX, SWALLOW = "hang", "regex", "swallow"


def mapper(state, value):
    if value == HANG:
        while True:
            pass
    if value == REGEX:
        re.match(r"(a+)+$", "a" * 40 + "b")
    if value == SWALLOW:  # a flow that swallows ordinary exceptions cannot swallow the timeout
        while True:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001, S110
                pass
    if isinstance(value, float):
        time.sleep(value)
        value = 1
    return state + value, state + value


def summing_flow():
    return Dataflow().stateful_map("sum", lambda key: 0, mapper).capture()


def run(events, on_error, timeout=0.3):
    with EventWatch(timeout) as watch:
        return apply_events(summing_flow(), events, {}, events[-1][0], on_error, watch=watch)


@pytest.mark.parametrize("hang", [HANG, REGEX, SWALLOW])
def test_skip_rejects_the_event_that_runs_past_the_timeout_and_goes_on(hang):
    began = time.monotonic()
    result = run([(0, "a", 1), (1, "a", hang), (2, "b", 5), (3, "a", 2)], "skip")
    assert time.monotonic() - began < 2
    [rejection] = result.rejected
    assert (rejection.epoch, rejection.key, rejection.kind) == (1, "a", "timeout")
    assert rejection.reason == (
        "timed out: the flow did not finish epoch 1 (key 'a') within 0.3 s (--batch-timeout)"
    )
    assert [line for _, line in result.outputs] == ['0 ["a", 1]', '2 ["b", 5]', '3 ["a", 3]']
    assert result.writes == {"a": b"3", "b": b"5"}
    assert result.applied_through == 3


def test_fail_stops_the_batch_at_the_event_that_runs_past_the_timeout():
    result = run([(0, "a", 1), (1, "b", 1), (2, "a", HANG), (3, "a", 2)], "fail")
    assert result.failed == Rejection(2, "a", result.failed.reason, "timeout")
    assert "within 0.3 s" in result.failed.reason
    assert result.applied_through == 1
    assert [line for _, line in result.outputs] == ['0 ["a", 1]', '1 ["b", 1]']


def test_the_limit_is_per_event_so_a_slow_batch_is_not_stopped():
    # 12 events of 0.05 s: 0.6 s in all, twice the timeout, none of them near it
    events = [(e, "a", 0.05) for e in range(12)]
    result = run(events, "fail", timeout=0.3)
    assert result.failed is None and not result.rejected
    assert result.writes == {"a": b"12"}


def test_the_timer_and_handler_before_it_are_put_back():
    def previous(signum, frame):
        raise AssertionError("not to be called")

    old = signal.signal(signal.SIGALRM, previous)
    signal.setitimer(signal.ITIMER_REAL, 1000.0)
    try:
        run([(0, "a", 1), (1, "a", HANG)], "skip")
        assert signal.getsignal(signal.SIGALRM) is previous
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 990 < remaining <= 1000
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_batch_carries_its_timeout_and_reads_one_stored_without_it():
    b = Batch("ns", 1, 0, 1, -1, 1, "f:flow", "skip", [0, 1], [b"x", b"y"], 2.5)
    assert Batch.decode(b.encode()) == b
    header = orjson.dumps(["ns", 1, 0, 1, -1, 1, "f:flow", "skip", [0, 1]])
    assert Batch.decode(header + b"\nx\ny").timeout == 0.0


def test_a_notice_keeps_the_kind_of_each_rejection():
    rejected = [Rejection(1, "a", "bad", "rejected"), Rejection(2, "b", "slow", "timeout")]
    failed = Rejection(3, "c", "died", "killed")
    notice = CommitNotice.decode(CommitNotice.encode_outputs(0, 2, [], [], rejected, failed))
    assert notice.rejected == rejected and notice.failed == failed


HUNG_FLOW = "tests.flows.hung_cart:flow"
KILLER_FLOW = "tests.flows.killer_cart:flow"
CURSED = '{"user_id": "a", "type": "order", "order_id": 1000000000}'
LINES = [
    '{"user_id": "a", "type": "order", "order_id": 1}',
    CURSED,
    '{"user_id": "a", "type": "order", "order_id": 2}',
]


def cart_batch(keys, flow, on_error, timeout=0.0):
    b = batch(keys, LINES, -1, 2, on_error=on_error)
    return Batch(b.namespace, b.generation, b.partition, b.partitions, b.after_epoch,
                 b.last_epoch, flow, on_error, b.epochs, b.lines, timeout)  # fmt: skip


def notices(r, keys):
    return [CommitNotice.decode(f[b"n"]) for _, f in r.xrange(keys.notices(1, 0))]


def test_a_worker_commits_a_timed_out_event_as_rejected(fake, keys):
    start(fake, keys)
    assert run_batch(fake, cart_batch(keys, HUNG_FLOW, "dead-letter", 0.3))["outcome"] == (
        "committed"
    )
    [notice] = notices(fake, keys)
    [rejection] = notice.rejected
    assert (rejection.epoch, rejection.key, rejection.kind) == (1, "a", "timeout")
    assert notice.epochs == [0, 2] and notice.applied_through == 2


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def die_at(fake, keys, b, attempt, index):
    """What a careful attempt that died while running event ``index`` leaves behind."""
    run = CarefulRun(fake, keys, b, attempt)
    run.start(batch_events(b))
    run.pid = dead_pid()
    run.probe(index, index + 1)


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_an_event_two_careful_attempts_died_on_is_poison(fake, keys, on_error):
    start(fake, keys)
    b = cart_batch(keys, KILLER_FLOW, on_error)
    die_at(fake, keys, b, 2, 1)  # attempt 1 died too, but ran without probes
    die_at(fake, keys, b, 3, 1)
    assert run_batch(fake, b, attempt=4)["outcome"] == "committed"
    [notice] = notices(fake, keys)
    reason = "killed its worker: 2 worker processes died running epoch 1 (key 'a')"
    if on_error == "skip":
        assert notice.rejected == [Rejection(1, "a", reason, "killed")]
        assert notice.epochs == [0, 2] and notice.applied_through == 2
    else:
        assert notice.failed == Rejection(1, "a", reason, "killed")
        assert notice.epochs == [0] and notice.applied_through == 0
    assert not fake.exists(keys.probe(0))  # the commit's attempt cleans its probe up


def test_one_death_at_an_event_is_not_enough_to_blame_it(fake, keys):
    start(fake, keys)
    b = cart_batch(keys, "tests.flows.picky_cart:flow", "skip")  # the cursed order is rejected
    die_at(fake, keys, b, 2, 1)
    assert run_batch(fake, b, attempt=3)["outcome"] == "committed"
    [notice] = notices(fake, keys)
    assert [r.kind for r in notice.rejected] == ["rejected"]  # run, and rejected by the flow


def test_a_probe_of_another_batch_or_a_live_process_counts_no_death(fake, keys):
    start(fake, keys)
    b = cart_batch(keys, KILLER_FLOW, "skip")
    other = Batch(
        b.namespace, b.generation, 0, 1, 2, 5, KILLER_FLOW, "skip", [3], [CURSED.encode()]
    )
    die_at(fake, keys, other, 2, 0)
    die_at(fake, keys, other, 3, 0)
    for attempt in (2, 3):  # this process is alive: its probes are not deaths
        run = CarefulRun(fake, keys, b, attempt)
        run.start(batch_events(b))
        run.probe(1, 2)
    assert CarefulRun(fake, keys, b, 4).start(batch_events(b)) == {}


def test_a_careful_attempt_refused_as_a_duplicate_leaves_a_newer_batchs_probe(fake, keys):
    start(fake, keys)
    b = batch(keys, LINES[:1], -1, 0)
    run_batch(fake, b)
    newer = batch(keys, LINES[2:], 0, 2)
    CarefulRun(fake, keys, newer, 2).start(batch_events(newer))
    assert run_batch(fake, b, attempt=2)["outcome"] == "duplicate"
    assert fake.hget(keys.probe(0), "batch") == b"g1-e0-2"
    assert Keys(keys.namespace).probe(0) == f"{keys.namespace}:{{{keys.namespace}-p0}}:probe"


def probe_of(fake, keys, b, attempt, index, pid):
    run = CarefulRun(fake, keys, b, attempt)
    run.start(batch_events(b))
    run.pid = pid
    run.probe(index, index + 1)


def test_a_careful_attempt_waits_for_a_hung_earlier_attempt_to_die_and_counts_it(fake, keys):
    start(fake, keys)
    b = cart_batch(keys, KILLER_FLOW, "skip")
    hung = subprocess.Popen(["sleep", "0.5"])  # ended by its backstop, as it were
    probe_of(fake, keys, b, 2, 1, hung.pid)
    began = time.monotonic()
    CarefulRun(fake, keys, b, 3).start(batch_events(b))
    assert time.monotonic() - began >= 0.3
    assert orjson.loads(fake.hget(keys.probe(0), "deaths")) == {"1": 1}
    hung.wait()


def test_an_earlier_attempt_that_outlives_the_wait_counts_no_death(fake, keys):
    start(fake, keys)
    b = cart_batch(keys, KILLER_FLOW, "skip")
    alive = subprocess.Popen(["sleep", "30"])
    try:
        probe_of(fake, keys, b, 2, 1, alive.pid)
        run = CarefulRun(fake, keys, b, 3)
        run.wait_for_death = 0.3
        run.start(batch_events(b))
        assert orjson.loads(fake.hget(keys.probe(0), "deaths")) == {}
    finally:
        alive.kill()
        alive.wait()


BACKSTOP = """
import sys, time
import tasks.watchdog
from tasks.apply import apply_events
from tasks.flow import Dataflow

tasks.watchdog.GRACE = 0.5

def mapper(state, value):
    while True:  # swallows even the timeout: only the backstop can stop it
        try:
            time.sleep(0.01)
        except BaseException:
            pass

flow = Dataflow().stateful_map("s", lambda key: 0, mapper).capture()
with tasks.watchdog.EventWatch(0.3) as watch:
    apply_events(flow, [(0, "a", 1)], {}, 0, "skip", watch=watch)
print("not reached")
"""


def test_a_hang_the_signal_cannot_stop_ends_the_process_after_the_grace():
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", BACKSTOP], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    took = time.monotonic() - began
    assert run.returncode == 1 and "not reached" not in run.stdout
    assert 0.7 < took < 10  # timeout 0.3 s + grace 0.5 s (+ the interpreter's start)
    assert run.stderr == ""  # the traceback dump goes to stderr only with debug logs


class Exited:
    """A worker process that has exited (what ``WorkerPool.supervise`` polls)."""

    def __init__(self, pid):
        self.pid = pid

    def poll(self):
        return 3


def quick_deaths(fake, monkeypatch, *, registered):
    from rq import SimpleWorker

    from orchestrator.workers import WorkerPool

    pool = WorkerPool(1, "unix:///nowhere", "ns")
    pids = iter(range(900_000, 900_010))

    def start_one(index=0):
        proc = Exited(next(pids))
        pool._started[proc.pid] = time.monotonic()  # it dies at once
        if registered:  # it registered with RQ, then a job killed it
            worker = SimpleWorker(["q"], connection=fake, name=f"w{proc.pid}")
            worker.pid = proc.pid
            worker.register_birth()
        return proc

    monkeypatch.setattr(pool, "_start_one", start_one)
    pool.processes = [start_one()]
    for _ in range(5):
        pool.supervise(fake)


def test_workers_that_die_at_start_are_a_crash_loop(fake, monkeypatch):
    from orchestrator.errors import WorkerDied

    with pytest.raises(WorkerDied, match="keep dying at start"):
        quick_deaths(fake, monkeypatch, registered=False)


def test_workers_a_job_killed_soon_after_their_start_are_no_crash_loop(fake, monkeypatch):
    quick_deaths(fake, monkeypatch, registered=True)  # (the driver isolates the poison event)


def test_an_event_that_timed_out_and_would_not_stop_is_reported_as_timed_out(fake, keys):
    start(fake, keys)
    b = cart_batch(keys, HUNG_FLOW, "skip", 3.0)
    for attempt in (2, 3):  # each timed out on event 1, swallowed it, and was ended
        run = CarefulRun(fake, keys, b, attempt)
        run.start(batch_events(b))
        run.pid = dead_pid()
        run.probe(1, 2)
        run.timed_out()
    [rejection] = CarefulRun(fake, keys, b, 4).start(batch_events(b)).values()
    assert rejection.kind == "timeout"
    assert rejection.reason == (
        "timed out: the flow did not finish epoch 1 (key 'a') within 3 s (--batch-timeout), "
        "and did not stop: 2 worker processes were ended running it"
    )


def test_under_fail_an_earlier_rejection_stops_the_batch_before_a_poison_event(fake, keys):
    start(fake, keys)
    lines = [CURSED, LINES[0], LINES[2]]  # the picky flow rejects the first
    b = batch(keys, lines, -1, 2)
    b = Batch(b.namespace, 1, 0, 1, -1, 2, "tests.flows.picky_cart:flow", "fail", b.epochs, b.lines)
    die_at(fake, keys, b, 2, 1)  # and two attempts died on the second, as it were
    die_at(fake, keys, b, 3, 1)
    run_batch(fake, b, attempt=4)
    [notice] = notices(fake, keys)
    assert notice.failed.epoch == 0 and notice.failed.kind == "rejected"
    assert notice.rejected == [] and notice.applied_through == -1


def test_a_paused_attempt_of_another_batch_that_wakes_up_counts_no_death(fake, keys):
    # An attempt of an older batch, paused, wakes up and writes where it is into the probe
    # that the partition's newer batch uses by then: the newer batch's next attempts must not
    # count that (dead, by then) process as a death at one of their own events.
    start(fake, keys)
    b = cart_batch(keys, KILLER_FLOW, "skip")
    older = Batch(
        b.namespace, b.generation - 1, 0, 1, 2, 5, KILLER_FLOW, "skip", [3], [CURSED.encode()]
    )
    stale = CarefulRun(fake, keys, older, 2)
    stale.start(batch_events(older))  # (before its pause)
    CarefulRun(fake, keys, b, 2).start(batch_events(b))  # the newer batch's careful attempt
    for attempt in (3, 4):
        stale.pid = dead_pid()
        stale.probe(1, 2)  # it wakes up, writes, and is gone by the time the next one looks
        CarefulRun(fake, keys, b, attempt).start(batch_events(b))
    assert CarefulRun(fake, keys, b, 5).start(batch_events(b)) == {}


def test_an_attempt_that_wakes_up_after_a_newer_batch_began_leaves_its_probe(fake, keys):
    # An attempt of an older batch, paused before it even read the probe, wakes up while the
    # partition's newer batch probes: it must not replace the deaths that batch has counted.
    start(fake, keys)
    b = cart_batch(keys, KILLER_FLOW, "skip")
    older = Batch(
        b.namespace, b.generation - 1, 0, 1, 2, 5, KILLER_FLOW, "skip", [3], [CURSED.encode()]
    )
    die_at(fake, keys, b, 2, 1)  # the newer batch: one death at its event 1 so far
    stale = CarefulRun(fake, keys, older, 2)
    assert stale.start(batch_events(older)) == {} and stale.stale
    stale.probe(0, 1)
    assert fake.hget(keys.probe(0), "batch") == CarefulRun(fake, keys, b, 9).batch_id.encode()
    die_at(fake, keys, b, 3, 1)  # a second death there: now it is poison
    assert set(CarefulRun(fake, keys, b, 4).start(batch_events(b))) == {1}
