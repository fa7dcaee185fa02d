"""A second flow for the same engine: a running balance per account.

Input lines look like ``{"account": "alice", "amount": 5}``; a line with
``"close": true`` closes the account: it emits the final balance and deletes the
account's state, so a later deposit starts again from zero. Run it with::

    orchestrator ingest examples/amounts.json --flow examples.running_sum:flow --namespace sums
"""

from __future__ import annotations

from typing import Any

from orchestrator import Dataflow


def key_off_account(event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Key every movement by its account."""
    return event["account"], event


def is_movement(keyed_event: tuple[str, dict[str, Any]]) -> bool:
    """Leave out events that neither move money nor close the account."""
    _, event = keyed_event
    return "amount" in event or event.get("close") is True


def new_account(account: str) -> dict[str, int]:
    """An account starts empty."""
    return {"balance": 0, "movements": 0}


def apply_movement(
    state: dict[str, int], event: dict[str, Any]
) -> tuple[dict[str, int] | None, dict[str, Any]]:
    """Add a movement to the balance, or close the account (its state is deleted)."""
    if event.get("close") is True:
        return None, {"closed": True, **state}
    amount = event["amount"]
    if not isinstance(amount, int):
        msg = f"amount must be an integer, got {amount!r}"
        raise TypeError(msg)
    state = {"balance": state["balance"] + amount, "movements": state["movements"] + 1}
    return state, {"closed": False, **state}


def format_balance(account__summary: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """The output record."""
    account, summary = account__summary
    return {"account": account, **summary}


flow = (
    Dataflow()
    .map(key_off_account)
    .filter(is_movement)
    .stateful_map("balance", new_account, apply_movement)
    .map(format_balance)
    .capture()
)
