"""Evaluation's library: scoring through lm-evaluation-harness (multiple choice and generation, IFEval offline),
paired statistics between stages, the local judge, held-out preference accuracy, and the summary, report and
chart evaluate.py writes."""
