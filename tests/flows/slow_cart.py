"""The cart join, slowed down (about 1 ms per event) so that tests can kill things mid-batch."""

import time

from tasks.cartjoin import cart_flow, joiner


def slow_joiner(state, event):
    time.sleep(0.001)
    return joiner(state, event)


flow = cart_flow(slow_joiner)
