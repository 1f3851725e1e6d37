"""Benchmarks: each writes JSON and a PNG plot and compares against a baseline in the same run."""
