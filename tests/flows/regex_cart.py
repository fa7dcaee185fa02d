"""The cart join, whose joiner runs a catastrophic regular expression on one order id.

``re`` holds the GIL while it backtracks (2**40 steps here), so the worker's
other threads starve; only a signal handler or a watchdog outside Python stops it.
"""

import re

from tasks.cartjoin import cart_flow, joiner

CURSED_ORDER = 10**9  # beyond any generated order id
CATASTROPHIC = re.compile(r"(a+)+$")


def regex_joiner(state, event):
    if event["order_id"] == CURSED_ORDER:
        CATASTROPHIC.match("a" * 40 + "b")
    return joiner(state, event)


flow = cart_flow(regex_joiner)
