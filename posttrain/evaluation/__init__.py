"""Evaluation's library: scoring through lm-evaluation-harness, paired statistics between stages, and
the summary, report and chart evaluate.py writes."""
