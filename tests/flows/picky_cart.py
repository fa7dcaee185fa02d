"""The cart join, with a joiner that rejects one order id: a rejection only a worker can find."""

from tasks.cartjoin import build_state, format_output, joiner, key_off_user_id, validate_event
from tasks.flow import Dataflow

CURSED_ORDER = 10**9  # beyond any generated order id


def picky_joiner(state, event):
    if event["order_id"] == CURSED_ORDER:
        raise ValueError(f"order {CURSED_ORDER} is cursed")
    return joiner(state, event)


flow = (
    Dataflow()
    .map(validate_event)
    .map(key_off_user_id)
    .stateful_map("joiner", build_state, picky_joiner)
    .map(format_output)
    .capture()
)
