"""Regate's benchmark suite: `python -m benchmarks [--quick]` (see suite.py)."""
