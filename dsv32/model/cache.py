"""Decoding caches: per layer, MLA's latent KV (kv_lora_rank + rope dims per token) and the
indexer's single-head key (index_head_dim per token, optionally FP8 with one fp32 scale per token).

Preallocated `[B, max_len, ...]` buffers, written at `[start:end]` by each forward (chunked prefill,
multi-token and single-token decode all go through the same write). `doc_ids` remembers the packing
segment of every cached token, so later tokens still see their document's start.

Ragged batches (the serving engine's continuous batching): set `lengths` to one length per row and each
row's new tokens go to its own positions `[lengths[b], lengths[b] + T)`; `rows(a, b)` is a view of some
rows that shares storage (prefill new requests into free rows, decode the first n rows).
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

    def write(self, start: int, kv, pe, index_k, index_scale, pos_BT: torch.Tensor | None = None):
        """Store T new tokens at [start, start + T), or at per-row positions `pos_BT` (ragged batch; then
        `start` is the largest row start). Returns the cache up to the end of the new tokens."""
        end = start + kv.shape[1]
        at = (slice(None), slice(start, end)) if pos_BT is None else \
            (torch.arange(kv.shape[0], device=kv.device)[:, None], pos_BT)
        self.kv[at] = kv
        self.pe[at] = pe
        key = index_k.to(self.index_k.dtype)
        if pos_BT is not None and self.index_k.element_size() == 1:  # FP8: scatter the bytes (index_put
            self.index_k.view(torch.uint8)[at] = key.view(torch.uint8)  # lacks float8 kernels on some builds)
        else:
            self.index_k[at] = key
        if self.index_scale is not None:
            self.index_scale[at] = index_scale
        return (self.kv[:, :end], self.pe[:, :end], self.index_k[:, :end],
                None if self.index_scale is None else self.index_scale[:, :end])

    def rows(self, a: int, b: int) -> "LayerCache":
        """Rows [a, b) as a view: writes go to this cache's storage."""
        view = LayerCache.__new__(LayerCache)
        view.kv, view.pe, view.index_k = self.kv[a:b], self.pe[a:b], self.index_k[a:b]
        view.index_scale = None if self.index_scale is None else self.index_scale[a:b]
        return view

    def resized(self, max_len: int) -> "LayerCache":
        """A copy with room for max_len tokens per row; the first min(old, new) positions carried over."""
        out = LayerCache.__new__(LayerCache)
        n = min(max_len, self.kv.shape[1])
        for name in ("kv", "pe", "index_k", "index_scale"):
            old = getattr(self, name)
            new = None
            if old is not None:
                new = (old.new_ones if name == "index_scale" else old.new_zeros)((old.shape[0], max_len, *old.shape[2:]))
                new[:, :n] = old[:, :n]
            setattr(out, name, new)
        return out

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first n cached tokens of row `src` into row `dst`."""
        for t in (self.kv, self.pe, self.index_k, self.index_scale):
            if t is not None:
                t[dst, :n] = t[src, :n]


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
        self.lengths: list[int] | None = None  # per-row lengths: a ragged batch (see the module docstring)

    def rows(self, a: int, b: int, lengths: list[int] | None = None) -> "Cache":
        """Rows [a, b) as a cache view sharing storage; `lengths` (one per row) makes it ragged,
        None makes it an empty plain cache (e.g. to prefill new requests into free rows)."""
        if not 0 <= a < b <= self.batch:
            raise ValueError(f"rows [{a}, {b}) outside the cache's batch of {self.batch}")
        if lengths is not None and len(lengths) != b - a:
            raise ValueError(f"{len(lengths)} lengths for {b - a} rows; give one length per row")
        view = Cache.__new__(Cache)
        view.batch, view.max_len = b - a, self.max_len
        view.lengths = None if lengths is None else list(lengths)
        view.length = 0 if lengths is None else max(lengths)
        view.layers = [layer.rows(a, b) for layer in self.layers]
        view.doc_ids = self.doc_ids[a:b]
        return view

    def resized(self, max_len: int) -> "Cache":
        """A copy with room for max_len tokens per row (the engine grows its cache on demand this way)."""
        out = Cache.__new__(Cache)
        out.batch, out.max_len, out.length = self.batch, max_len, min(self.length, max_len)
        out.lengths = None if self.lengths is None else [min(n, max_len) for n in self.lengths]
        out.layers = [layer.resized(max_len) for layer in self.layers]
        out.doc_ids = self.doc_ids.new_zeros((self.batch, max_len))
        n = min(max_len, self.max_len)
        out.doc_ids[:, :n] = self.doc_ids[:, :n]
        return out

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Copy row `src`'s first n tokens to row `dst` (the engine compacts its running rows this way)."""
        for layer in self.layers:
            layer.copy_row(src, dst, n)
        self.doc_ids[dst, :n] = self.doc_ids[src, :n]

    def advance(self, n_new: int) -> None:
        """Record that n_new tokens were written to every row."""
        self.length += n_new
        if self.lengths is not None:
            self.lengths = [n + n_new for n in self.lengths]

    def reserve(self, n_new: int, batch: int) -> int:
        """Check that `n_new` tokens fit; returns the start position for them."""
        if batch != self.batch:
            raise ValueError(f"batch size {batch} does not match the cache's batch size {self.batch}; "
                             f"allocate a cache for this batch with model.new_cache({batch}, max_len)")
        if self.length + n_new > self.max_len:
            raise ValueError(f"{self.length} cached + {n_new} new tokens exceed the cache's max_len={self.max_len}; "
                             "allocate a larger cache with model.new_cache(batch, max_len)")
        return self.length
