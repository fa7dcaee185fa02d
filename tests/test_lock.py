"""The driver lock: taken once, renewed by its heartbeat, released at the end."""

import time

import pytest

import orchestrator.lock as lock_module
from orchestrator.errors import DriverLocked
from orchestrator.lock import DriverLock


def test_the_heartbeat_keeps_the_lock_alive(r, keys, monkeypatch):
    monkeypatch.setattr(lock_module, "LOCK_TTL", 0.5)
    monkeypatch.setattr(lock_module, "HEARTBEAT", 0.1)
    with DriverLock(r, keys) as held:
        time.sleep(1.2)  # more than twice the TTL: only renewals keep it
        assert r.get(keys.driver_lock) == held.token.encode()
        with pytest.raises(DriverLocked, match="another driver is running"):
            DriverLock(r, keys).__enter__()  # same process: never "dead", so refused
    assert r.get(keys.driver_lock) is None
