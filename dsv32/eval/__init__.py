"""Evaluation: DSA indexer quality (more suites arrive with the training and RL issues)."""

from .indexer_recall import indexer_recall

__all__ = ["indexer_recall"]
