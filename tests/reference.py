"""The seed's cart join as a plain single-process loop: the oracle the pipeline is compared with.

Written from the tutorial's code (json module, no recovery), independent of
the pipeline's own modules.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable


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


def reference_run(
    lines: Iterable[str], *, from_epoch: int = 0, skip_bad: bool = False
) -> tuple[str, dict[str, dict]]:
    """Return (output text, final state per user) for the given input lines.

    Lines are numbered from 0; output starts at ``from_epoch`` but state is built
    from the start, as a run that never stopped would have it. With ``skip_bad``
    a line that does not parse or that the joiner rejects is left out.
    """
    states: dict[str, dict] = {}
    out = []
    for epoch, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            user_id = event["user_id"]
            # a copy, so that an event the joiner rejects leaves the state as it was
            state = copy.deepcopy(states[user_id]) if user_id in states else build_state(user_id)
            state, emitted = joiner(state, event)
        except (ValueError, KeyError, TypeError):
            if not skip_bad:
                raise
            continue
        states[user_id] = state
        if epoch >= from_epoch:
            out.append(f"{epoch} {json.dumps(format_output((user_id, emitted)))}\n")
    return "".join(out), states
