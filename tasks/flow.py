"""A small dataflow description: map -> stateful_map -> map -> capture, as in the seed.

The engine splits a flow at its stateful step: the steps before it run in the
driver (they decide the key, hence the partition), the stateful step and the
steps after it run on the RQ workers, next to the state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import FlowError

Mapper = Callable[[Any, Any], tuple[Any, Any]]


@dataclass(frozen=True)
class MapStep:
    """A stateless step: ``fn(item) -> item``."""

    fn: Callable[[Any], Any]


@dataclass(frozen=True)
class StatefulMapStep:
    """The keyed step: ``builder(key) -> state``, ``mapper(state, value) -> (state, out)``."""

    step_id: str
    builder: Callable[[str], Any]
    mapper: Mapper


@dataclass
class Flow:
    """A linear flow of steps ending in ``capture()``."""

    steps: list[MapStep | StatefulMapStep] = field(default_factory=list)
    captured: bool = False

    def map(self, fn: Callable[[Any], Any]) -> Flow:
        """Append a stateless map step."""
        self._check_open()
        self.steps.append(MapStep(fn))
        return self

    def stateful_map(self, step_id: str, builder: Callable[[str], Any], mapper: Mapper) -> Flow:
        """Append the keyed stateful step; a flow has exactly one."""
        self._check_open()
        if any(isinstance(s, StatefulMapStep) for s in self.steps):
            msg = f"stateful_map {step_id!r}: a flow may have only one stateful step"
            raise FlowError(msg)
        self.steps.append(StatefulMapStep(step_id, builder, mapper))
        return self

    def capture(self) -> Flow:
        """Mark the end of the flow: its items are the pipeline's output."""
        self._check_open()
        self.captured = True
        return self

    def _check_open(self) -> None:
        if self.captured:
            msg = "the flow is already captured: add steps before capture()"
            raise FlowError(msg)

    def split(self) -> tuple[list[MapStep], StatefulMapStep, list[MapStep]]:
        """Return (steps before the stateful step, the stateful step, steps after it)."""
        stateful = [i for i, s in enumerate(self.steps) if isinstance(s, StatefulMapStep)]
        if not stateful:
            msg = "the flow has no stateful_map step"
            raise FlowError(msg)
        if not self.captured:
            msg = "the flow does not end with capture()"
            raise FlowError(msg)
        i = stateful[0]
        before = [s for s in self.steps[:i] if isinstance(s, MapStep)]
        after = [s for s in self.steps[i + 1 :] if isinstance(s, MapStep)]
        step = self.steps[i]
        assert isinstance(step, StatefulMapStep)
        return before, step, after


_loaded: dict[str, Flow] = {}


def load_flow(path: str) -> Flow:
    """Import a flow by ``package.module:attribute`` (cached per process).

    Raises:
        FlowError: the path is malformed, the module cannot be imported, or the
            attribute is not a Flow.
    """
    if path in _loaded:
        return _loaded[path]
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        msg = f"invalid flow {path!r}: expected 'package.module:attribute'"
        raise FlowError(msg)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        msg = f"cannot import flow module {module_name!r}: {e}"
        raise FlowError(msg) from e
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow):
        msg = f"{path!r} is not a Flow (found {type(flow).__name__})"
        raise FlowError(msg)
    flow.split()  # validate its shape once, at load
    _loaded[path] = flow
    return flow
