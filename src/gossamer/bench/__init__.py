"""Benchmark programs: each runs Gossamer and its reference side by side and reports ratios."""
