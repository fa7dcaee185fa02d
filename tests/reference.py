"""The seed's cart join as a plain single-process loop: the oracle the pipeline is compared with.

The tutorial's functions (json module, no recovery) come from ``bench/plain.py``,
which is independent of the pipeline's own modules.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable

from bench.plain import build_state, format_output, joiner


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
