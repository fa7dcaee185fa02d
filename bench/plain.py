"""The seed's cart join as a plain single-process loop (json module, no recovery).

This is the yardstick: the tutorial's functions, unchanged, driven by the
simplest loop that prints the same lines. ``python -m bench.plain FILE``
writes its output to stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any, TextIO


def build_state(user_id_as_key):
    return {"unpaid_order_ids": [], "paid_order_ids": []}


def joiner(state, event):
    e_type = event["type"]
    order_id = event["order_id"]
    if e_type == "order":
        state["unpaid_order_ids"].append(order_id)
    elif e_type == "payment":
        state["unpaid_order_ids"].remove(order_id)
        state["paid_order_ids"].append(order_id)
    return state, state


def format_output(user_id__joined_state):
    user_id, joined_state = user_id__joined_state
    return {
        "user_id": user_id,
        "paid_order_ids": joined_state["paid_order_ids"],
        "unpaid_order_ids": joined_state["unpaid_order_ids"],
    }


def run_plain(lines: Iterable[str], out: TextIO) -> dict[str, Any]:
    """Join every line, writing ``EPOCH JSON`` lines to ``out``; return the final states."""
    states: dict[str, Any] = {}
    for epoch, line in enumerate(lines):
        if not line.strip():
            continue
        event = json.loads(line)
        user_id = event["user_id"]
        state = states.get(user_id)
        if state is None:
            state = states[user_id] = build_state(user_id)
        state, emitted = joiner(state, event)
        out.write(f"{epoch} {json.dumps(format_output((user_id, emitted)))}\n")
    return states


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        run_plain(f, sys.stdout)
