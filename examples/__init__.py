"""Example flows for the engine (importable as ``examples.<module>`` from the repository root)."""
