"""The cart join, with a joiner that rejects one order id: a rejection only a worker can find."""

from tasks.cartjoin import cart_flow, joiner

CURSED_ORDER = 10**9  # beyond any generated order id


def picky_joiner(state, event):
    if event["order_id"] == CURSED_ORDER:
        raise ValueError(f"order {CURSED_ORDER} is cursed")
    return joiner(state, event)


flow = cart_flow(picky_joiner)
