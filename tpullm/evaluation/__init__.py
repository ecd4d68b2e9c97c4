"""Evaluation: log-likelihood scoring, perplexity and the LM Evaluation Harness adapter."""
