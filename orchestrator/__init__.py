"""The driver and the CLI of the pipeline; ``tasks`` holds what the workers run."""

__all__: list[str] = []
