"""The cart join's documented semantics, as a model independent of the engine.

It follows the README's "Bad input" and "cart join cases" rules: which lines
are bad and why, what a payment before its order does, what duplicates do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_LINE_BYTES = 1 << 20


@dataclass
class ModelRun:
    output: str = ""
    states: dict[str, dict] = field(default_factory=dict)
    bad: list[int] = field(default_factory=list)  # epochs of bad lines


def is_bad(raw: bytes) -> bool:
    """Whether a non-blank line is rejected, by the README's rules."""
    if len(raw.rstrip(b"\n")) > MAX_LINE_BYTES:
        return True
    try:
        event = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return True
    if not isinstance(event, dict) or any(f not in event for f in ("user_id", "type", "order_id")):
        return True
    order_id = event["order_id"]
    return (
        not isinstance(event["user_id"], str)
        or not isinstance(event["type"], str)
        or not isinstance(order_id, int)
        or isinstance(order_id, bool)
        or event["type"] not in ("order", "payment")
    )


def apply(state: dict, event: dict) -> None:
    oid = event["order_id"]
    held = state.get("early_payment_ids", [])
    if event["type"] == "order":
        if oid in state["unpaid_order_ids"] or oid in state["paid_order_ids"]:
            return
        if oid in held:
            held.remove(oid)
            if not held:
                del state["early_payment_ids"]
            state["paid_order_ids"].append(oid)
        else:
            state["unpaid_order_ids"].append(oid)
    else:
        if oid in state["unpaid_order_ids"]:
            state["unpaid_order_ids"].remove(oid)
            state["paid_order_ids"].append(oid)
        elif oid not in state["paid_order_ids"] and oid not in held:
            state.setdefault("early_payment_ids", []).append(oid)


def cart_model(lines: list[bytes], *, from_epoch: int = 0) -> ModelRun:
    """Run the model over raw input lines (with or without their newline), skipping bad ones."""
    run = ModelRun()
    out = []
    for epoch, raw in enumerate(lines):
        if not raw.strip():
            continue
        if is_bad(raw):
            run.bad.append(epoch)
            continue
        event = json.loads(raw)
        user = event["user_id"]
        state = run.states.setdefault(user, {"unpaid_order_ids": [], "paid_order_ids": []})
        apply(state, event)
        if epoch >= from_epoch:
            item = {
                "user_id": user,
                "paid_order_ids": state["paid_order_ids"],
                "unpaid_order_ids": state["unpaid_order_ids"],
            }
            out.append(f"{epoch} {json.dumps(item)}\n")
    run.output = "".join(out)
    return run
