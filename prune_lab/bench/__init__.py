"""Benchmark pieces behind scripts/bench.py (issue 8): each returns ratios against a baseline
measured in the same process."""
