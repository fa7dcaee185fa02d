"""The seed tutorial's code, top to bottom, on this engine.

The blocks below are the tutorial's Python code blocks in order, with only the
three lines the issue allows changed: ``from bytewax import Dataflow``,
``from bytewax import run_main`` and the SQLite recovery config, replaced by
``orchestrator``'s equivalents.
"""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from conftest import REPO, SEED_FIRST_RUN, SEED_INPUT, SEED_RESUMED_RUN

SEED_FILE = REPO.parent / "shared" / "seeds" / "000_07afe2e2505bdab5.txt"

REPLACEMENTS = [
    ("from bytewax import Dataflow", "from orchestrator import Dataflow"),
    ("from bytewax import run_main", "from orchestrator import run_main"),
    (
        "from bytewax.recovery import SqliteRecoveryConfig",
        "from orchestrator.recovery import RedisRecoveryConfig",
    ),
    (
        'recovery_config = SqliteRecoveryConfig(recovery_dir.name + "/state-recovery.sqlite3")',
        "recovery_config = RedisRecoveryConfig(recovery_dir.name)",
    ),
]

BLOCKS = [
    """import json


def input_builder(worker_index, worker_count):
    assert worker_index == 0  # We're not going to worry about multiple workers yet.
    with open("cart-join.json") as f:
        for epoch, line in enumerate(f):
            obj = json.loads(line)
            yield epoch, obj
""",
    """from orchestrator import Dataflow

flow = Dataflow()
""",
    """def key_off_user_id(event):
    return event["user_id"], event
    
    
flow.map(key_off_user_id)
""",
    """def build_state(user_id_as_key):
    return {"unpaid_order_ids": [], "paid_order_ids": []}
""",
    """def joiner(state, event):
    e_type = event["type"]
    order_id = event["order_id"]
    if e_type == "order":
        state["unpaid_order_ids"].append(order_id)
    elif e_type == "payment":
        state["unpaid_order_ids"].remove(order_id)
        state["paid_order_ids"].append(order_id)
    return state, state


flow.stateful_map("joiner", build_state, joiner)
""",
    """def format_output(user_id__joined_state):
    user_id, joined_state = user_id__joined_state
    return {
        "user_id": user_id,
        "paid_order_ids": joined_state["paid_order_ids"],
        "unpaid_order_ids": joined_state["unpaid_order_ids"],
    }

flow.map(format_output)
""",
    """flow.capture()
""",
    """def output_builder(worker_index, worker_count):
    def output_handler(epoch_item):
        epoch, item = epoch_item
        line = json.dumps(item)
        print(epoch, line)
    return output_handler
""",
    """from orchestrator import run_main

run_main(flow, input_builder, output_builder)
""",
    """RESUME_FROM_EPOCH = 0


def input_builder(worker_index, worker_count):
    assert worker_index == 0  # We're not going to worry about multiple workers yet.
    with open("cart-join.jsons") as f:
        for epoch, line in enumerate(f):
            if epoch < RESUME_FROM_EPOCH:
                continue
            obj = json.loads(line)
            yield epoch, obj
""",
    """from tempfile import TemporaryDirectory
from orchestrator.recovery import RedisRecoveryConfig

recovery_dir = TemporaryDirectory()  # We'll store this somewhere temporary for this test.
recovery_config = RedisRecoveryConfig(recovery_dir.name)
""",
    """run_main(flow, input_builder, output_builder, recovery_config=recovery_config)
""",
    """def input_builder(worker_index, worker_count):
    assert worker_index == 0  # We're not going to worry about multiple workers yet.
    with open("cart-join.jsons") as f:
        for epoch, line in enumerate(f):
            if epoch < RESUME_FROM_EPOCH:
                continue
            if line.startswith("FAIL"):  # Fix the bug.
                continue
            obj = json.loads(line)
            yield epoch, obj
""",
    """RESUME_FROM_EPOCH = 1


run_main(flow, input_builder, output_builder, recovery_config=recovery_config)
""",
]


def run_block(code, namespace):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<seed>", "exec"), namespace)
    return out.getvalue()


def test_the_seeds_code_prints_the_seeds_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The tutorial saves its data as cart-join.json and later reads cart-join.jsons.
    for name in ("cart-join.json", "cart-join.jsons"):
        (tmp_path / name).write_text(SEED_INPUT.read_text())
    ns = {"__name__": "__main__"}  # functions defined in __main__, as in a script
    for code in BLOCKS[:8]:
        assert run_block(code, ns) == ""

    # The first run, without recovery: epochs 0-4, then the JSON error reaches the caller.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(json.decoder.JSONDecodeError):
        exec(BLOCKS[8], ns)
    assert out.getvalue() == SEED_FIRST_RUN

    run_block(BLOCKS[9], ns)
    run_block(BLOCKS[10], ns)
    # With recovery: the same error, and the state up to epoch 4 is now persisted.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(json.decoder.JSONDecodeError):
        exec(BLOCKS[11], ns)
    assert out.getvalue() == SEED_FIRST_RUN

    # The fixed input builder, resumed from epoch 1: the tutorial's six lines.
    run_block(BLOCKS[12], ns)
    assert run_block(BLOCKS[13], ns) == SEED_RESUMED_RUN
    ns["recovery_dir"].cleanup()


def test_the_blocks_are_the_seeds_own_code():
    if not SEED_FILE.exists():
        pytest.skip(f"the seed is not beside this checkout (looked for {SEED_FILE})")
    text = SEED_FILE.read_text()
    seed_blocks = re.findall(r"```python[^\n]*\n(.*?)```", text, flags=re.S)
    for old, new in REPLACEMENTS:
        seed_blocks = [b.replace(old, new) for b in seed_blocks]
    assert seed_blocks == BLOCKS
    assert Path(SEED_INPUT).read_text().strip() in text
