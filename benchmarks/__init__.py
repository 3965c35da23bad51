"""Benchmarks, run as scripts (``python -m benchmarks.<name>``); pytest does not collect them."""
