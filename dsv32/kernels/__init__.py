"""Attention ops. `reference` is the plain-PyTorch ground truth every fast path is tested against."""
