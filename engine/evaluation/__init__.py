"""Benchmark evaluation (`rast eval`): grading, the paper's metrics, prompt templates and the runner."""
from rast_engine.evaluation.grading import extract_answer, is_equivalent, pass_at_k

__all__ = ["extract_answer", "is_equivalent", "pass_at_k"]
