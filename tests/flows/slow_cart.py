"""The cart join, slowed down (about 1 ms per event) so that tests can kill things mid-batch."""

import time

from tasks.cartjoin import build_state, format_output, joiner, key_off_user_id, validate_event
from tasks.flow import Dataflow


def slow_joiner(state, event):
    time.sleep(0.001)
    return joiner(state, event)


flow = (
    Dataflow()
    .map(validate_event)
    .map(key_off_user_id)
    .stateful_map("joiner", build_state, slow_joiner)
    .map(format_output)
    .capture()
)
