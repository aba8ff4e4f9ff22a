"""Benchmark pieces behind scripts/bench.py: each returns ratios against a baseline
measured in the same process."""
