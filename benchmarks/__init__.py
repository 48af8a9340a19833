"""Benchmark harness for fada_core (``python benchmarks/run.py --help``); results in RESULTS.md."""
