"""What RQ workers import: the flow vocabulary, the joiner, the Redis store and the job entry point.

Kept import-light on purpose: every worker process imports this package.
"""

__all__: list[str] = []
