"""The pipeline's errors: one base class and a few specific ones."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class InvalidEvent(PipelineError):
    """Raised when an input item is not an event the flow accepts (bad shape, missing field)."""


class FlowError(PipelineError):
    """Raised when a flow is built wrongly or cannot be loaded by its import path."""


class StaleGeneration(PipelineError):
    """Raised when a batch belongs to a driver run that has been superseded."""


class OutOfOrder(PipelineError):
    """Raised when a batch arrives before the batch that precedes it in its partition."""


class NamespaceError(PipelineError):
    """Raised when a command does not fit the namespace's stored state (partitions, epochs)."""


class RedisUnavailable(PipelineError):
    """Raised when Redis cannot be reached or the embedded server cannot start."""


class RedisLostData(RedisUnavailable):
    """Raised when Redis holds less than it acknowledged: a lost append-only-file tail, a failover
    to a lagging replica, evicted keys, or a restart without persistence."""


class Superseded(PipelineError):
    """Raised when another driver run has taken over the namespace from this one."""
