"""Decoding caches: per layer, MLA's latent KV (kv_lora_rank + rope dims per token) and the
indexer's single-head key (index_head_dim per token, optionally FP8 with one fp32 scale per token).

Preallocated `[B, max_len, ...]` buffers, written at `[start:end]` by each forward (chunked prefill,
multi-token and single-token decode all go through the same write). `doc_ids` remembers the packing
segment of every cached token, so later tokens still see their document's start.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class LayerCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        m, ix = cfg.mla, cfg.indexer
        self.kv = torch.zeros(batch, max_len, m.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(batch, max_len, m.qk_rope_head_dim, dtype=dtype, device=device)
        key_dtype = torch.float8_e4m3fn if ix.cache_fp8 else dtype
        self.index_k = torch.zeros(batch, max_len, ix.head_dim, dtype=key_dtype, device=device)
        self.index_scale = torch.ones(batch, max_len, dtype=torch.float32, device=device) if ix.quant == "fp8_sim" else None

    def write(self, start: int, kv, pe, index_k, index_scale):
        end = start + kv.shape[1]
        self.kv[:, start:end] = kv
        self.pe[:, start:end] = pe
        self.index_k[:, start:end] = index_k.to(self.index_k.dtype)
        if self.index_scale is not None:
            self.index_scale[:, start:end] = index_scale
        return (self.kv[:, :end], self.pe[:, :end], self.index_k[:, :end],
                None if self.index_scale is None else self.index_scale[:, :end])


class Cache:
    """All layers' caches plus the number of tokens written so far (`length`)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                             "ask for a shorter cache or raise the config's max_seq_len")
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.layers = [LayerCache(cfg, batch, max_len, dtype, device) for _ in range(cfg.n_layers)]
        self.doc_ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)

    def reserve(self, n_new: int, batch: int) -> int:
        """Check that `n_new` tokens fit; returns the start position for them."""
        if batch != self.batch:
            raise ValueError(f"batch size {batch} does not match the cache's batch size {self.batch}; "
                             f"allocate a cache for this batch with model.new_cache({batch}, max_len)")
        if self.length + n_new > self.max_len:
            raise ValueError(f"{self.length} cached + {n_new} new tokens exceed the cache's max_len={self.max_len}; "
                             "allocate a larger cache with model.new_cache(batch, max_len)")
        return self.length
