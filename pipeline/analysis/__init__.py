"""Evaluation, robustness, audit, reports and benchmarks."""
