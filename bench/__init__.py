"""Benchmarks against the reference tools; each module runs with `python -m bench.<name>` and prints a table."""
