"""The cart join, whose joiner kills its own worker process on one order id (a poison pill).

Order id 10**9 ends the process with ``os._exit``, 10**9 + 1 with SIGKILL.
"""

import os
import signal

from tasks.cartjoin import cart_flow, joiner

EXIT_ORDER = 10**9  # beyond any generated order id
SIGKILL_ORDER = 10**9 + 1


def killer_joiner(state, event):
    if event["order_id"] == EXIT_ORDER:
        os._exit(3)
    if event["order_id"] == SIGKILL_ORDER:
        os.kill(os.getpid(), signal.SIGKILL)
    return joiner(state, event)


flow = cart_flow(killer_joiner)
