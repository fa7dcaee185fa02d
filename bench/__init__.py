"""Benchmarks and the deterministic cart-event generator."""
