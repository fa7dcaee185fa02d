"""The cart join, with a joiner that never returns for one order id: a pure-Python hang."""

from tasks.cartjoin import cart_flow, joiner

CURSED_ORDER = 10**9  # beyond any generated order id


def hung_joiner(state, event):
    if event["order_id"] == CURSED_ORDER:
        n = 0
        while True:  # a flow bug: it never ends, and swallows ordinary exceptions
            try:
                n += 1
            except Exception:  # noqa: BLE001, S110 - what a careless flow does
                pass
    return joiner(state, event)


flow = cart_flow(hung_joiner)
