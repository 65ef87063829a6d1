"""Evaluation: DSA indexer quality and long-context retrieval (more suites arrive with the training and RL issues)."""

from .indexer_recall import indexer_recall
from .long_context import retrieval_accuracy, score_documents, token_losses, trailing_loss

__all__ = ["indexer_recall", "retrieval_accuracy", "score_documents", "token_losses", "trailing_loss"]
