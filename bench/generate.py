"""A deterministic generator of cart events in the seed's format.

Orders get fresh ids; a payment is only ever for an unpaid order of the same
user, so the seed's joiner accepts every event. Usage::

    python -m bench.generate --events 100000 --users 10000 --seed 7 > events.json

``--hot-key-orders N`` makes N of the events orders of one more user, ``hot``, spread at
random through the file: one key whose state grows with every one of its events.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator

HOT_USER = "hot"


def generate(
    events: int,
    users: int,
    seed: int = 0,
    payment_share: float = 0.4,
    hot_key_orders: int = 0,
) -> Iterator[str]:
    """Yield ``events`` JSON lines (without newline) for ``users`` users; ``hot_key_orders``
    of them are orders of user ``hot``."""
    if not 0 <= hot_key_orders <= events:
        raise ValueError(f"hot_key_orders must be 0..{events}: {hot_key_orders}")
    rng = random.Random(seed)
    hot = set(rng.sample(range(events), hot_key_orders)) if hot_key_orders else set()
    unpaid: dict[int, list[int]] = {}
    next_order = 1
    for i in range(events):
        if i in hot:
            yield json.dumps({"user_id": HOT_USER, "type": "order", "order_id": next_order})
            next_order += 1
            continue
        user = rng.randrange(users)
        orders = unpaid.get(user)
        if orders and rng.random() < payment_share:
            order_id = orders.pop(rng.randrange(len(orders)))
            kind = "payment"
        else:
            order_id = next_order
            next_order += 1
            unpaid.setdefault(user, []).append(order_id)
            kind = "order"
        yield json.dumps({"user_id": f"u{user}", "type": kind, "order_id": order_id})


def main(argv: list[str] | None = None) -> None:
    """Write generated events to stdout or a file."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hot-key-orders",
        type=int,
        default=0,
        metavar="N",
        help="make N of the events orders of one user, 'hot' (default 0)",
    )
    parser.add_argument("--output", default="-", help="file to write (default stdout)")
    args = parser.parse_args(argv)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    with out:
        for line in generate(
            args.events, args.users, args.seed, hot_key_orders=args.hot_key_orders
        ):
            out.write(line + "\n")


if __name__ == "__main__":
    main()
