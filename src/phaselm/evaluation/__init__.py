"""Evaluation: text metrics, scoring, benchmarks and reports."""
