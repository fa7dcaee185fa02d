"""The driver, the CLI and the seed's Python API: ``Dataflow`` and ``run_main``.

``tasks`` holds what the RQ workers run.
"""

from orchestrator.inprocess import run_main
from tasks.flow import Dataflow

__all__ = ["Dataflow", "run_main"]
