"""The driver, the CLI and the seed's Python API: ``Dataflow`` and ``run_main``.

``tasks`` holds what the RQ workers run. The API is imported on first use, so
that the CLI can start the embedded server before it imports redis-py and RQ.
"""

from typing import Any

__all__ = ["Dataflow", "run_main"]


def __getattr__(name: str) -> Any:
    if name == "run_main":
        from orchestrator.inprocess import run_main

        return run_main
    if name == "Dataflow":
        from tasks.flow import Dataflow

        return Dataflow
    msg = f"module 'orchestrator' has no attribute {name!r}"
    raise AttributeError(msg)
