"""The Dataflow operators' contracts, and run_main with and without recovery."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import orjson
import pytest
import redis

from orchestrator import Dataflow, inprocess, run_main
from orchestrator.queries import state_of
from orchestrator.recovery import RedisRecoveryConfig
from tasks.apply import apply_events
from tasks.errors import FlowError, NamespaceError, RedisLostData
from tasks.flow import keyed, load_flow, run_steps
from tasks.keys import Keys

from conftest import REPO, RedisServer, cli_env


def collect(flow, items, recovery_config=None):
    """Run flow over [(epoch, item)] in-process; return the outputs."""
    out = []
    run_main(flow, lambda i, n: iter(items), lambda i, n: out.append, recovery_config)
    return out


def counter():
    return Dataflow().stateful_map("count", lambda key: 0, lambda s, v: (s + v, s + v))


# --- operators -------------------------------------------------------------------------


def test_stateless_operators_compose_in_order():
    flow = Dataflow().map(lambda x: x * 10).filter(lambda x: x != 20).flat_map(lambda x: [x, x + 1])
    assert run_steps(flow.steps, 1) == [10, 11]
    assert run_steps(flow.steps, 2) == []


def test_stateful_map_emits_key_and_value_and_keeps_state_per_key():
    flow = Dataflow().map(lambda e: (e["k"], e["v"]))
    flow = flow.stateful_map("sum", lambda key: 0, lambda s, v: (s + v, s + v)).capture()
    items = [(0, {"k": "a", "v": 1}), (1, {"k": "b", "v": 5}), (2, {"k": "a", "v": 2})]
    assert collect(flow, items) == [(0, ("a", 1)), (1, ("b", 5)), (2, ("a", 3))]


def test_builder_gets_the_key():
    flow = Dataflow().stateful_map("seen", lambda key: [key], lambda s, v: (s + [v], list(s + [v])))
    flow.capture()
    assert collect(flow, [(0, ("k", 1))]) == [(0, ("k", ["k", 1]))]


def test_stateful_map_refuses_items_that_are_not_key_value_pairs():
    step = counter().capture().split()[1]
    with pytest.raises(
        TypeError, match=r"stateful_map 'count' expects \(key, value\) tuples, got dict"
    ):
        keyed(step, {"user_id": "a"})
    with pytest.raises(TypeError, match="stateful_map 'count' expects string keys, got int"):
        keyed(step, (1, 2))


def test_run_main_raises_the_type_error_after_committing_what_came_before():
    flow = counter().capture()
    out = []
    with pytest.raises(TypeError, match="got int"):
        run_main(flow, lambda i, n: iter([(0, ("a", 1)), (1, 5)]), lambda i, n: out.append)
    assert out == [(0, ("a", 1))]


def test_a_second_stateful_step_is_refused_when_the_flow_is_built():
    with pytest.raises(FlowError, match="only one stateful step"):
        counter().stateful_map("again", lambda k: 0, lambda s, v: (s, v))


def test_a_flow_needs_a_stateful_step_and_capture():
    with pytest.raises(FlowError, match="no stateful_map"):
        Dataflow().map(str).capture().split()
    with pytest.raises(FlowError, match="does not end with capture"):
        counter().split()
    with pytest.raises(FlowError, match="already captured"):
        counter().capture().map(str)


def test_operators_want_functions():
    with pytest.raises(TypeError, match="map expects a function, got int"):
        Dataflow().map(3)


def test_a_mapper_must_return_state_and_output():
    flow = Dataflow().stateful_map("bad", lambda k: 0, lambda s, v: s).capture()
    result = apply_events(flow, [(0, "k", 1)], {}, 0, "skip")
    assert result.rejected[0].reason.startswith(
        "TypeError: stateful_map 'bad': the mapper must return"
    )


def test_returning_none_deletes_the_state_and_the_key_starts_again():
    flow = Dataflow().stateful_map(
        "until-reset", lambda k: 0, lambda s, v: (None, s) if v == "reset" else (s + v, s + v)
    )
    flow.capture()
    items = [(0, ("a", 2)), (1, ("a", 3)), (2, ("a", "reset")), (3, ("a", 4))]
    assert collect(flow, items) == [(0, ("a", 2)), (1, ("a", 5)), (2, ("a", 5)), (3, ("a", 4))]


def test_several_items_per_epoch_and_flat_map_after_the_stateful_step():
    flow = counter().flat_map(lambda kv: [kv[1], -kv[1]]).capture()
    items = [(0, ("a", 1)), (0, ("b", 2)), (1, ("a", 1))]
    assert collect(flow, items) == [(0, 1), (0, -1), (0, 2), (0, -2), (1, 2), (1, -2)]


# --- run_main --------------------------------------------------------------------------


def test_without_recovery_nothing_is_kept_between_calls():
    flow = counter().capture()
    assert collect(flow, [(0, ("a", 1))]) == [(0, ("a", 1))]
    assert collect(flow, [(1, ("a", 1))]) == [(1, ("a", 1))]


@pytest.fixture(params=["directory", "url"])
def recovery(request, tmp_path, namespace):
    if request.param == "directory":
        return RedisRecoveryConfig(tmp_path / "recovery")
    return RedisRecoveryConfig(request.getfixturevalue("redis_url"), namespace=namespace)


def test_with_recovery_a_run_from_epoch_n_starts_from_the_state_at_n_minus_1(recovery):
    flow = counter().capture()
    items = [(e, ("a", 1)) for e in range(5)]
    assert [v for _, (_, v) in collect(flow, items, recovery)] == [1, 2, 3, 4, 5]
    # Resume after the end: the state is intact.
    assert collect(flow, [(5, ("a", 10))], recovery) == [(5, ("a", 15))]
    # Start again from epoch 2: state as at the end of epoch 1; epochs >= 2 are redone.
    assert collect(flow, [(2, ("a", 100))], recovery) == [(2, ("a", 102))]
    # A start past the committed epochs continues from the committed state.
    assert collect(flow, [(9, ("a", 1))], recovery) == [(9, ("a", 103))]


def counting_flow_failing(where, exc):
    """Counts items per key; raises exc at epoch 3 in the step named by where."""

    def before(kv):
        if where == "before" and kv[1] == 3:
            raise exc
        return kv

    def mapper(count, v):
        if where == "mapper" and v == 3:
            raise exc
        return count + 1, count + 1

    return Dataflow().map(before).stateful_map("count", lambda k: 0, mapper).capture()


@pytest.mark.parametrize("where", ["input", "before", "mapper", "output"])
def test_user_exceptions_propagate_after_every_earlier_epoch_is_committed_and_delivered(
    where, tmp_path
):
    recovery = RedisRecoveryConfig(tmp_path)
    boom = RuntimeError(f"boom in {where}")

    def inputs(i, n):
        for epoch in range(6):
            if where == "input" and epoch == 3:
                raise boom
            yield epoch, ("a", epoch)

    flow = counting_flow_failing(where, boom)
    out = []

    def output(i, n):
        def handler(epoch_item):
            if where == "output" and epoch_item[0] == 3:
                raise boom
            out.append(epoch_item)

        return handler

    with pytest.raises(RuntimeError, match=f"boom in {where}"):
        run_main(flow, inputs, output, recovery)
    assert out == [(0, ("a", 1)), (1, ("a", 2)), (2, ("a", 3))]
    # Resuming from epoch 3 continues from the state committed through epoch 2.
    assert collect(counter().capture(), [(3, ("a", 1))], recovery) == [(3, ("a", 4))]


def test_epochs_must_not_go_backwards():
    with pytest.raises(Exception, match="epochs must not decrease"):
        collect(counter().capture(), [(2, ("a", 1)), (1, ("a", 1))])


def test_flows_for_workers_must_be_importable(tmp_path, monkeypatch):
    (tmp_path / "mainish.py").write_text(
        "from orchestrator import Dataflow\n"
        "def step(s, v):\n    return s, v\n"
        "step.__module__ = '__main__'\n"
        "flow = Dataflow().stateful_map('x', lambda k: 0, step).capture()\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlowError, match="defined in __main__.*use orchestrator.run_main|run_main"):
        load_flow("mainish:flow")
    with pytest.raises(FlowError, match="__main__"):
        load_flow("__main__:flow")
    with pytest.raises(FlowError, match="cannot import flow module 'nowhere'"):
        load_flow("nowhere:flow")
    with pytest.raises(FlowError, match="expected 'package.module:attribute'"):
        load_flow("nowhere")
    assert json.dumps(load_flow("tasks.cartjoin:flow").split()[1].step_id) == '"joiner"'


# --- run_main and a hot key ---------------------------------------------------------------


def growing():
    """Each key's state is the list of its values; it emits the list's length."""
    return Dataflow().stateful_map("grow", lambda key: [], lambda s, v: ([*s, v], len(s) + 1))


def hot_and_cold(events=800):
    """Three events in four for the key "hot", the rest spread over ten cold keys."""
    return [
        (e, (f"cold{e // 4 % 10}" if e % 4 == 0 else "hot", 100_000 + e)) for e in range(events)
    ]


def images_per_record(r, keys, key):
    """For each undo record of run_main's partition: how many events of ``key`` it holds and
    how many of them have their before-image stored."""
    counts = []
    for record in r.zrange(keys.undo(0), 0, -1):
        _, _, record_keys, steps = orjson.loads(record.partition(b"\n")[0])
        mine = [step for k, step in zip(record_keys, steps, strict=True) if k == key]
        counts.append((len(mine), sum(1 for step in mine if step == 0)))
    return counts


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(inprocess, "BATCH_EVENTS", 100)
    monkeypatch.setattr(inprocess, "DERIVE_FROM_BYTES", 1000)  # ~125 values of the hot key


def run_hot_and_cold(redis_url, namespace):
    """run_main of ``growing`` over ``hot_and_cold()``, kept in Redis: its outputs (checked
    against the plain loop's) and the hot key's events and images per undo record."""
    recovery = RedisRecoveryConfig(redis_url, namespace=namespace)
    items = hot_and_cold()
    outputs = collect(growing().capture(), items, recovery)
    assert outputs == reference_outputs(items)
    hot = images_per_record(redis.Redis.from_url(redis_url), Keys(namespace), "hot")
    return recovery, items, outputs, hot


def test_a_hot_keys_history_follows_its_state_not_its_square(redis_url, namespace, small_batches):
    recovery, items, outputs, hot = run_hot_and_cold(redis_url, namespace)
    r = redis.Redis.from_url(redis_url)
    flow = growing().capture()
    assert len(hot) == 8
    # Its state is over 1,000 bytes from the third batch on: at most two images a batch.
    assert [images <= 2 for events, images in hot[2:]] == [True] * 6
    assert sum(events for events, _ in hot) == 600
    # A cold key's state stays small: its image is stored at every event.
    cold = images_per_record(r, Keys(namespace), "cold3")
    assert [events == images for events, images in cold] == [True] * 8

    # `state --at-epoch` cannot re-derive it without the flow object: it says so.
    with pytest.raises(FlowError, match="written by run_main.*run it again from the epoch"):
        state_of(r, Keys(namespace), "hot", 550)
    assert state_of(r, Keys(namespace), "cold3", 550)["state"] == [
        100_000 + e for e in range(12, 551, 40)
    ]
    # Going back to epoch 550 re-derives the hot key's state there: the same outputs again.
    assert collect(flow, items[550:], recovery) == outputs[550:]


def test_going_back_over_a_large_state_needs_a_flow_that_gives_the_same_states(
    redis_url, namespace, small_batches
):
    recovery = RedisRecoveryConfig(redis_url, namespace=namespace)
    items = hot_and_cold()
    outputs = collect(growing().capture(), items, recovery)
    doubling = Dataflow().stateful_map("grow", lambda key: [], lambda s, v: ([*s, 2 * v], 0))
    with pytest.raises(FlowError, match="no longer gives the state key 'hot' had"):
        collect(doubling.capture(), items[550:], recovery)
    # Nothing was restored with it: the flow it ran with goes back as before.
    assert collect(growing().capture(), items[550:], recovery) == outputs[550:]


def reference_outputs(items):
    states: dict[str, list[int]] = {}
    out = []
    for epoch, (key, value) in items:
        states.setdefault(key, []).append(value)
        out.append((epoch, (key, len(states[key]))))
    return out


def test_a_hot_keys_commits_are_bounded_by_bytes(redis_url, namespace, small_batches, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_COMMIT_BYTES", "3000")  # a few events of the hot key
    recovery, items, outputs, hot = run_hot_and_cold(redis_url, namespace)
    flow = growing().capture()
    # Eight batches of 100 events; the hot key's later ones in parts of a few events each.
    assert len(hot) > 40
    assert max(events for events, _ in hot[-10:]) <= 3
    assert collect(flow, items[550:], recovery) == outputs[550:]


def test_an_exception_in_a_later_part_comes_after_the_parts_before_it(
    redis_url, namespace, small_batches, monkeypatch
):
    monkeypatch.setenv("ORCHESTRATOR_COMMIT_BYTES", "3000")
    recovery = RedisRecoveryConfig(redis_url, namespace=namespace)

    def mapper(state, value):
        if value == 100_000 + 650:
            raise ValueError("no")
        return [*state, value], len(state) + 1

    flow = Dataflow().stateful_map("grow", lambda key: [], mapper).capture()
    items = hot_and_cold()
    out = []
    with pytest.raises(ValueError, match="no"):
        run_main(flow, lambda i, n: iter(items), lambda i, n: out.append, recovery)
    assert out == reference_outputs(items)[:650]
    # The next run starts at 650 (its first epoch) from the state at the end of 649.
    assert collect(growing().capture(), items[650:], recovery) == reference_outputs(items)[650:]


def test_run_main_refuses_a_redis_that_comes_back_with_less(
    redis_url, namespace, small_batches, monkeypatch
):
    monkeypatch.setenv("ORCHESTRATOR_COMMIT_BYTES", "3000")
    recovery = RedisRecoveryConfig(redis_url, namespace=namespace)
    r, keys = redis.Redis.from_url(redis_url), Keys(namespace)
    partition = (keys.progress(0), keys.state(0), keys.undo(0))
    saved, out = {}, []

    def output(item):
        out.append(item)
        if item[0] == 300:
            saved.update({key: r.dump(key) for key in partition})
        if item[0] == 420:  # Redis comes back with what it held at epoch 300 (a lost tail)
            for key, dumped in saved.items():
                r.restore(key, 0, dumped, replace=True)

    items = hot_and_cold()
    with pytest.raises(RedisLostData, match="came back with less than it acknowledged"):
        run_main(growing().capture(), lambda i, n: iter(items), lambda i, n: output, recovery)
    assert out == reference_outputs(items)[: len(out)]
    # The next run refuses too, rather than go on from what Redis has left.
    with pytest.raises(RedisLostData, match="partition 0 is at epoch 301, but it had applied"):
        collect(growing().capture(), items[len(out) :], recovery)
    # From before the loss, with its history, it goes back and gives the right outputs.
    assert collect(growing().capture(), items[250:], recovery) == reference_outputs(items)[250:]


def test_run_main_refuses_a_server_that_may_evict_its_state(own_redis):
    redis.Redis.from_url(own_redis.url).config_set("maxmemory-policy", "allkeys-lru")
    items = [(e, ("a", 1)) for e in range(3)]
    with pytest.raises(NamespaceError, match="allkeys-lru.*allow_eviction=True"):
        collect(counter().capture(), items, RedisRecoveryConfig(own_redis.url))
    allowed = RedisRecoveryConfig(own_redis.url, allow_eviction=True)
    assert collect(counter().capture(), items, allowed) == [
        (0, ("a", 1)),
        (1, ("a", 2)),
        (2, ("a", 3)),
    ]


def test_run_main_allowed_to_run_on_an_evicting_server_stops_when_it_evicts(own_redis):
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + (4 << 20))
    out = []

    def output(item):
        out.append(item)
        if item[0] == 1500:  # someone else fills the server: it evicts
            for i in range(100):
                client.set(f"filler:{i}", b"x" * (100 << 10))

    items = [(e, (f"k{e % 50}", 1)) for e in range(3000)]
    allowed = RedisRecoveryConfig(own_redis.url, allow_eviction=True)
    # (the refusal names what it found first: the eviction, or a key of the run gone)
    with pytest.raises(RedisLostData):
        run_main(counter().capture(), lambda i, n: iter(items), lambda i, n: output, allowed)
    # Nothing made from what was left was handed over.
    assert out == [(e, (key, e // 50 + 1)) for e, (key, _) in items[: len(out)]]
    assert len(out) < 3000
    # and no later run builds on what is left
    with pytest.raises(RedisLostData):
        collect(counter().capture(), items[len(out) :], allowed)


PAUSED_RUN = """
import os, signal, sys, time
from orchestrator import Dataflow, inprocess, run_main
from orchestrator.recovery import RedisRecoveryConfig
inprocess.BATCH_EVENTS = 50
url, namespace, out_path, first, last, *pause_at = sys.argv[1:]
flow = Dataflow().stateful_map("count", lambda key: 0, lambda s, v: (s + v, s + v)).capture()
items = [(e, (f"k{e % 7}", 1)) for e in range(int(first), int(last))]

def inputs(i, n):
    for item in items:
        if pause_at and item[0] == int(pause_at[0]):
            os.kill(os.getpid(), signal.SIGSTOP)  # paused while it reads, between two commits
        yield item

with open(out_path, "a", buffering=1) as out:
    def handler(item):
        out.write(f"{item[0]} {item[1][0]} {item[1][1]}\\n")
        time.sleep(0.002)
    try:
        run_main(flow, inputs, lambda i, n: handler,
                 RedisRecoveryConfig(url, namespace=namespace))
    except Exception as e:
        print(type(e).__name__, e, file=sys.stderr)
        sys.exit(3)
"""


def counts_of(first, last):
    """The plain loop's output lines of PAUSED_RUN's items, epochs first..last-1."""
    counts: dict[str, int] = {}
    lines = []
    for e in range(last):
        key = f"k{e % 7}"
        counts[key] = counts.get(key, 0) + 1
        lines.append(f"{e} {key} {counts[key]}")
    return lines[first:]


def start_paused_run(tmp_path, redis_url, namespace, out, first, last, *pause_at):
    """PAUSED_RUN over epochs first..last-1 in a child process, with a 1 s driver lock."""
    script = tmp_path / "paused.py"
    script.write_text(PAUSED_RUN)
    args = [sys.executable, str(script), redis_url, namespace, str(out), str(first), str(last),
            *pause_at]  # fmt: skip
    env = cli_env(ORCHESTRATOR_DRIVER_LOCK_TTL="1")
    return subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def take_over_while_paused(paused, other):
    """``paused`` is stopped: its lock expires, ``other()`` starts a run that takes the
    namespace over and ends, then ``paused`` wakes up. Returns what ``paused`` said."""
    try:
        time.sleep(2.5)  # its lock (TTL 1 s) expires
        after = other()
        _, said = after.communicate(timeout=60)
        assert after.returncode == 0, said
        paused.send_signal(signal.SIGCONT)
        _, said = paused.communicate(timeout=60)
        return said
    finally:
        paused.send_signal(signal.SIGCONT)
        paused.kill()


def test_a_paused_run_main_wakes_up_to_a_refusal_and_the_run_after_it_is_exact(
    redis_url, namespace, tmp_path
):
    first_out, second_out = tmp_path / "first.txt", tmp_path / "second.txt"

    def start(out, first, last):
        return start_paused_run(tmp_path, redis_url, namespace, out, first, last)

    paused = start(first_out, 0, 2000)
    try:
        deadline = time.monotonic() + 30
        while not first_out.exists() or len(first_out.read_text().splitlines()) < 300:
            assert time.monotonic() < deadline and paused.poll() is None
            time.sleep(0.01)
        paused.send_signal(signal.SIGSTOP)
    except BaseException:
        paused.kill()
        raise
    # Another run takes the namespace over from before where the paused one was, to the end.
    taken = int(first_out.read_text().splitlines()[-1].split()[0]) - 100
    said = take_over_while_paused(paused, lambda: start(second_out, taken, 2000))
    assert paused.returncode == 3
    # (refused at its next commit or its next record, whichever it reaches first)
    assert "another driver took over" in said or "was taken over by another run" in said, said
    # The second run's outputs are the plain loop's from where it started.
    expected = counts_of(0, 2000)
    assert second_out.read_text().splitlines() == expected[taken:]
    # and what the paused one handed over before and after its pause was exact too
    lines = first_out.read_text().splitlines()
    assert lines == expected[: len(lines)]


def test_a_run_main_paused_between_commits_wakes_up_to_a_refusal_and_writes_nothing(
    redis_url, namespace, tmp_path
):
    first_out, second_out, third_out = (tmp_path / f"{n}.txt" for n in ("1", "2", "3"))

    def start(out, first, last, *pause_at):
        return start_paused_run(tmp_path, redis_url, namespace, out, first, last, *pause_at)

    paused = start(first_out, 0, 2000, "120")  # (it commits every 50 epochs: 0-49, 50-99)
    _, status = os.waitpid(paused.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        paused.kill()
        pytest.fail(f"the run did not stop itself: {status}")
    # another run takes over, from before where it stopped, to the end
    said = take_over_while_paused(paused, lambda: start(second_out, 60, 2000))
    assert first_out.read_text().splitlines() == counts_of(0, 100)  # nothing after its pause
    assert second_out.read_text().splitlines() == counts_of(60, 2000)
    assert paused.returncode == 3, said
    assert "was taken over by another run" in said, said
    # The second run's states are intact: a run after it goes on from them.
    third = start(third_out, 2000, 2007)
    _, said = third.communicate(timeout=60)
    assert third.returncode == 0, said
    assert third_out.read_text().splitlines() == counts_of(2000, 2007)


def test_a_new_namespace_whose_input_starts_later_is_refused_unless_first_epoch_says_so(
    recovery,
):
    items = [(e, ("a", 1)) for e in range(3, 6)]
    with pytest.raises(RedisLostData, match=r"no record of earlier runs.*first_epoch=3"):
        collect(counter().capture(), items, recovery)
    told = dataclasses.replace(recovery, first_epoch=3)
    assert collect(counter().capture(), items, told) == [
        (3, ("a", 1)),
        (4, ("a", 2)),
        (5, ("a", 3)),
    ]
    # Once it has a record, a run may start anywhere, as before.
    assert collect(counter().capture(), [(5, ("a", 10))], recovery) == [(5, ("a", 12))]


def test_run_main_refuses_to_go_on_from_a_redis_that_restarted_empty(tmp_path):
    server = RedisServer(str(tmp_path), appendonly=False).start()  # a restart comes back empty
    try:
        recovery = RedisRecoveryConfig(server.url)
        items = [(e, ("a", 1)) for e in range(10)]
        assert collect(counter().capture(), items[:5], recovery)[-1] == (4, ("a", 5))
        server.kill()
        server.start()
        with pytest.raises(RedisLostData, match="no record of earlier runs.*epoch 5"):
            collect(counter().capture(), items[5:], recovery)
        assert not redis.Redis.from_url(server.url).keys("*run-main*")  # nothing written
        # Run again from the start: every output is exact.
        assert collect(counter().capture(), items, recovery)[-1] == (9, ("a", 10))
    finally:
        server.stop()


def test_run_main_refuses_to_go_on_from_an_embedded_server_that_lost_its_files(tmp_path):
    recovery = RedisRecoveryConfig(tmp_path / "recovery")
    items = [(e, ("a", 1)) for e in range(10)]
    assert collect(counter().capture(), items[:5], recovery)[-1] == (4, ("a", 5))
    shutil.rmtree(tmp_path / "recovery")  # its data directory, gone between two runs
    with pytest.raises(RedisLostData, match="no record of earlier runs.*epoch 5"):
        collect(counter().capture(), items[5:], recovery)
    assert collect(counter().capture(), items, recovery)[-1] == (9, ("a", 10))


def test_first_epoch_must_be_an_int():
    with pytest.raises(TypeError, match="first_epoch must be an int"):
        RedisRecoveryConfig("unused", first_epoch="3")


def test_each_output_is_handed_over_as_it_was_emitted(recovery):
    # The mapper emits its state and changes it again for the key's next event, in the same
    # batch; a state of 1 KiB or more with plain_json=True stays decoded between the key's
    # events (the same object): each output must still be the value at its own event.
    def mapper(orders, order):
        orders.append(order)
        return orders, {"orders": orders, "last": (order[:3], [order[:3]])}

    flow = Dataflow().stateful_map("orders", lambda key: [], mapper, plain_json=True).capture()
    orders = [f"{e:03}" + "x" * 100 for e in range(30)]
    got = collect(flow, [(e, ("a", order)) for e, order in enumerate(orders)], recovery)
    assert got == [
        (e, ("a", {"orders": orders[: e + 1], "last": (order[:3], [order[:3]])}))
        for e, order in enumerate(orders)
    ]


def test_an_output_copy_is_deep_and_falls_back_to_deepcopy_for_what_it_does_not_know():
    from collections import namedtuple

    from orchestrator.inprocess import copy_output

    Point = namedtuple("Point", "x y")
    shared = [1, 2]
    item = {"a": [shared, shared], "p": Point([1], 2), "t": (1.5, None, True, b"x")}
    copied = copy_output(item)
    assert copied == item and type(copied["p"]) is Point
    shared.append(3)
    item["p"].x.append(9)
    assert copied == {"a": [[1, 2], [1, 2]], "p": Point([1], 2), "t": (1.5, None, True, b"x")}
    looped: list = [1]
    looped.append(looped)  # (contains itself: deepcopy keeps the loop)
    again = copy_output(looped)
    assert again[0] == 1 and again[1] is again and again is not looped
    keyed_by_tuple = {(1, 2): [3]}
    assert copy_output(keyed_by_tuple) == keyed_by_tuple
