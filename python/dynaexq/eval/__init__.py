"""Evaluation: causal stream perplexity and accuracy, policies side by side, reports."""
