"""Evaluation: reconstruction metrics shared by training logs, evaluation and benchmarks."""
