"""Evaluation: perplexity (zero-shot and efficiency come later)."""

from gqa_prune.evaluation.perplexity import PerplexityResult, PPLMetric, evaluate_perplexity

__all__ = ["PPLMetric", "PerplexityResult", "evaluate_perplexity"]
