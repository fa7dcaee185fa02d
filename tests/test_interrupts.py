"""Ctrl-C and SIGTERM in a command: an interrupt at once, except in a held section (the driver
writing committed lines and recording them), which it lets finish."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from orchestrator import interrupts
from orchestrator.interrupts import held_interrupts
from orchestrator.server import AnnouncedRetry


@pytest.fixture(autouse=True)
def installed():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    gave_up = AnnouncedRetry.give_up
    interrupts.install()
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    AnnouncedRetry.give_up = gave_up
    interrupts.HELD.pending = False


def signal_self(signum=signal.SIGINT) -> None:
    os.kill(os.getpid(), signum)  # (the handler runs before os.kill's caller goes on)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_outside_a_held_section_a_signal_interrupts_at_once(signum):
    done = []
    with pytest.raises(KeyboardInterrupt):
        signal_self(signum)
        done.append("after")
    assert done == []


def test_a_held_section_finishes_and_the_interrupt_comes_at_its_end():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            signal_self()
            done.append("write")
            with held_interrupts():  # (nested: the outermost one raises)
                done.append("record")
            done.append("after the record")
        done.append("after the section")
    assert done == ["write", "record", "after the record"]


def test_a_second_signal_is_ignored():
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            signal_self()
            signal_self(signal.SIGTERM)
    signal_self()  # ignored: the process is stopping already
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_record_waiting_for_a_lost_redis_gives_up_and_the_interrupt_is_raised():
    assert not AnnouncedRetry.give_up
    with pytest.raises(KeyboardInterrupt) as raised:
        with held_interrupts():
            signal_self()
            # the client's retries stop at once: what the record then raises
            assert AnnouncedRetry.give_up
            raise redis.ConnectionError("Connection refused")
    assert isinstance(raised.value.__cause__, redis.ConnectionError)


def test_any_other_failure_in_a_held_section_is_raised_as_it_is():
    class Refused(Exception):
        pass

    with pytest.raises(Refused):
        with held_interrupts():
            signal_self()
            raise Refused("Redis came back with less than it acknowledged")


def test_without_a_signal_a_held_section_changes_nothing():
    with held_interrupts():
        pass
    with pytest.raises(ValueError, match="bad"), held_interrupts():
        raise ValueError("bad")
