"""The dataflow API: ``Dataflow().map(...).stateful_map(...).map(...).capture()``, as in the seed.

The engine splits a flow at its stateful step: the steps before it run where
the input is read (they decide the key, hence the partition), the stateful
step and the steps after it run next to the state (on the RQ workers, or in
the calling process for ``run_main``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import FlowError

Mapper = Callable[[Any, Any], tuple[Any, Any]]

# What a namespace written by ``run_main`` records as its flow (then its stateful step's
# id): no module to import, the flow object lives in the program that ran it.
RUN_MAIN_FLOW = "run_main:"


@dataclass(frozen=True)
class MapStep:
    """``fn(item) -> item``."""

    fn: Callable[[Any], Any]


@dataclass(frozen=True)
class FilterStep:
    """Keeps the items for which ``fn(item)`` is true."""

    fn: Callable[[Any], bool]


@dataclass(frozen=True)
class FlatMapStep:
    """``fn(item) -> iterable of items``."""

    fn: Callable[[Any], Iterable[Any]]


@dataclass(frozen=True)
class StatefulMapStep:
    """The keyed step: ``builder(key) -> state``; ``mapper(state, value) -> (state, out)``."""

    step_id: str
    builder: Callable[[str], Any]
    mapper: Mapper
    # The flow's promise that its states hold plain JSON values only (``stateful_map``).
    plain_json: bool = False


Step = MapStep | FilterStep | FlatMapStep


@dataclass
class Dataflow:
    """A linear flow: stateless steps, one ``stateful_map``, stateless steps, ``capture()``."""

    steps: list[Step | StatefulMapStep] = field(default_factory=list)
    captured: bool = False
    # set by ``line_key``: lines the driver may route by a regex, without parsing them
    line_key: re.Pattern[bytes] | None = None

    def map(self, fn: Callable[[Any], Any]) -> Dataflow:
        """Transform every item with ``fn``."""
        return self._add(MapStep(_callable(fn, "map")))

    def filter(self, fn: Callable[[Any], bool]) -> Dataflow:
        """Keep only the items for which ``fn(item)`` is true."""
        return self._add(FilterStep(_callable(fn, "filter")))

    def flat_map(self, fn: Callable[[Any], Iterable[Any]]) -> Dataflow:
        """Replace every item with the items of the iterable ``fn(item)`` returns."""
        return self._add(FlatMapStep(_callable(fn, "flat_map")))

    def stateful_map(
        self,
        step_id: str,
        builder: Callable[[str], Any],
        mapper: Mapper,
        *,
        plain_json: bool = False,
    ) -> Dataflow:
        """Keep state per key: items must be ``(key, value)``; emits ``(key, out)``.

        ``builder(key)`` makes a key's first state; ``mapper(state, value)``
        returns ``(new_state, out)``. A new state of ``None`` deletes the key's
        state: its next item starts again from ``builder(key)``. States must be
        JSON values (they are stored in Redis as JSON), and the mapper sees each
        state as decoded from its JSON.

        ``plain_json=True`` is a promise: the states hold nothing but dicts with
        string keys, lists, strings, ints, finite floats, booleans and None (no
        tuple, set or subclass of these), so that decoding a state's JSON gives
        it back as it was. A worker then keeps a key's state decoded from one of
        its events to the next in a batch, instead of decoding its JSON again at
        every event (a hot key's large state: docs/performance.md). Break the
        promise and the mapper may see, within a batch, a value its JSON would
        have turned into another (a tuple instead of a list).

        Raises:
            FlowError: the flow already has a stateful step (one per flow).
        """
        if any(isinstance(s, StatefulMapStep) for s in self.steps):
            msg = f"stateful_map {step_id!r}: a flow may have only one stateful step"
            raise FlowError(msg)
        return self._add(
            StatefulMapStep(
                step_id, _callable(builder, "builder"), _callable(mapper, "mapper"), plain_json
            )
        )

    def capture(self) -> Dataflow:
        """End the flow: its items are the output."""
        if self.captured:
            msg = "the flow is already captured"
            raise FlowError(msg)
        self.captured = True
        return self

    def key_lines_by(self, pattern: bytes) -> Dataflow:
        """Declare which input lines the driver may route without parsing them.

        ``pattern`` is a regex over a line's bytes (without its newline) with a group
        named ``key``. It is a promise: every line it matches in full is valid input
        that the steps before ``stateful_map`` turn into exactly one event, whose key
        is the ``key`` group's bytes decoded as UTF-8. The driver then finds such a
        line's partition from those bytes alone; every other line (another layout, bad
        input) is parsed and checked as without it, so a narrow pattern is always safe.
        The workers parse every line anyway.

        Raises:
            FlowError: the pattern does not compile, is not bytes, or has no ``key`` group.
        """
        if not isinstance(pattern, bytes):
            msg = f"key_lines_by expects a bytes pattern, got {type(pattern).__name__}"
            raise FlowError(msg)
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            msg = f"key_lines_by: invalid pattern: {e}"
            raise FlowError(msg) from None
        if "key" not in compiled.groupindex:
            msg = "key_lines_by: the pattern has no group named 'key': (?P<key>...)"
            raise FlowError(msg)
        self.line_key = compiled
        return self

    def _add(self, step: Step | StatefulMapStep) -> Dataflow:
        if self.captured:
            msg = "the flow is already captured: add steps before capture()"
            raise FlowError(msg)
        self.steps.append(step)
        return self

    def split(self) -> tuple[list[Step], StatefulMapStep, list[Step]]:
        """Return (steps before the stateful step, the stateful step, steps after it).

        Raises:
            FlowError: no stateful step, or no ``capture()``.
        """
        stateful = [s for s in self.steps if isinstance(s, StatefulMapStep)]
        if not stateful:
            msg = "the flow has no stateful_map step"
            raise FlowError(msg)
        if not self.captured:
            msg = "the flow does not end with capture()"
            raise FlowError(msg)
        i = self.steps.index(stateful[0])
        before = [s for s in self.steps[:i] if not isinstance(s, StatefulMapStep)]
        after = [s for s in self.steps[i + 1 :] if not isinstance(s, StatefulMapStep)]
        return before, stateful[0], after

    def functions(self) -> list[Callable[..., Any]]:
        """Every user function of the flow."""
        out: list[Callable[..., Any]] = []
        for s in self.steps:
            out += [s.builder, s.mapper] if isinstance(s, StatefulMapStep) else [s.fn]
        return out


def _callable(fn: Any, what: str) -> Any:
    if not callable(fn):
        msg = f"{what} expects a function, got {type(fn).__name__}"
        raise TypeError(msg)
    return fn


def run_steps(steps: list[Step], item: Any) -> list[Any]:
    """Run stateless steps over one item; the result has 0, 1 or more items."""
    items = [item]
    for step in steps:
        if isinstance(step, MapStep):
            items = [step.fn(x) for x in items]
        elif isinstance(step, FilterStep):
            items = [x for x in items if step.fn(x)]
        else:
            items = [y for x in items for y in step.fn(x)]
    return items


def make_router(
    steps: list[Step], stateful: StatefulMapStep
) -> Callable[[Any], list[tuple[str, Any]]]:
    """A function from an input item to the ``(key, value)`` events it becomes.

    Runs the steps before the stateful one and checks their output (``keyed``).
    For the common flow of plain maps it avoids the general path's lists: this
    runs once per input line.
    """
    if not all(isinstance(s, MapStep) for s in steps):
        return lambda item: [keyed(stateful, x) for x in run_steps(steps, item)]
    fns = [s.fn for s in steps]

    def route(item: Any) -> list[tuple[str, Any]]:
        for fn in fns:
            item = fn(item)
        if type(item) is tuple and len(item) == 2 and type(item[0]) is str:
            return [item]
        return [keyed(stateful, item)]

    return route


def make_emitter(steps: list[Step]) -> Callable[[Any], list[Any]]:
    """A function from the stateful step's ``(key, emitted)`` to the flow's output items."""
    one = single_emitter(steps)
    if one is None:
        return lambda item: run_steps(steps, item)
    return lambda item: [one(item)]


def single_emitter(steps: list[Step]) -> Callable[[Any], Any] | None:
    """For steps that are all plain maps, the composed function giving the one output item
    (no lists: it runs once per event); None if a step can give more or fewer items."""
    if not all(isinstance(s, MapStep) for s in steps):
        return None
    fns = [s.fn for s in steps]
    if not fns:
        return lambda item: item
    if len(fns) == 1:
        return fns[0]

    def emit(item: Any) -> Any:
        for fn in fns:
            item = fn(item)
        return item

    return emit


def keyed(step: StatefulMapStep, item: Any) -> tuple[str, Any]:
    """Check that an item entering the stateful step is ``(key, value)`` with a string key.

    Raises:
        TypeError: naming the step and what the item was.
    """
    if not (isinstance(item, tuple | list) and len(item) == 2):
        msg = (
            f"stateful_map {step.step_id!r} expects (key, value) tuples, "
            f"got {type(item).__name__}: {_short(item)}"
        )
        raise TypeError(msg)
    key, value = item
    if not isinstance(key, str):
        msg = (
            f"stateful_map {step.step_id!r} expects string keys, got {type(key).__name__}: {key!r}"
        )
        raise TypeError(msg)
    return key, value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_loaded: dict[str, Dataflow] = {}


def load_flow(path: str) -> Dataflow:
    """Import a flow by ``package.module:attribute`` (cached per process).

    The current directory is importable, as with ``python -m``.

    Raises:
        FlowError: the path is malformed, names ``__main__``, cannot be
            imported, is not a Dataflow, or its functions live in ``__main__``
            (which workers cannot import).
    """
    if path in _loaded:
        return _loaded[path]
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        msg = f"invalid flow {path!r}: expected 'package.module:attribute'"
        raise FlowError(msg)
    if module_name == "__main__":
        raise FlowError(_main_message(path))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        msg = (
            f"cannot import flow module {module_name!r}: {type(e).__name__}: {e} "
            f"(run from the directory that holds it, or add that directory to PYTHONPATH)"
        )
        raise FlowError(msg) from e
    flow = getattr(module, attr, None)
    if not isinstance(flow, Dataflow):
        msg = f"{path!r} is not a Dataflow (found {type(flow).__name__})"
        raise FlowError(msg)
    if any(getattr(fn, "__module__", None) == "__main__" for fn in flow.functions()):
        raise FlowError(_main_message(path))
    flow.split()  # validate its shape once, at load
    _loaded[path] = flow
    return flow


def _main_message(path: str) -> str:
    return (
        f"flow {path!r} uses functions defined in __main__, which RQ workers cannot import: "
        f"put the flow in a module and pass --flow module:attribute, or run it in-process "
        f"with orchestrator.run_main"
    )
