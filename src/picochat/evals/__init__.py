"""Evaluation on real benchmarks."""
