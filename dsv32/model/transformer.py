"""The DeepSeek-V3.2 decoder: embedding, blocks of (MLA + DSA, MLP or MoE), final norm, LM head.

    from dsv32 import Transformer, ModelConfig
    model = Transformer(ModelConfig())          # or Transformer.from_pretrained("path/to/hf_dir")
    logits = model(input_ids)                   # [B, T, vocab]
    model.set_attn_mode("sparse")               # top-k attention (what the training stages flip)

Legend: B batch, T new tokens, S cached + new tokens, d model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import rope
from .attention import MLA, AttnContext, RMSNorm
from .cache import Cache
from .config import ModelConfig
from .moe import MLP, Gate, MoE


@dataclass
class Trace:
    """Opt-in record of the choices a forward pass made, one entry per layer.

    routes: expert ids [B, T, k] (None for dense-MLP layers); replay them with `model(..., routes=...)`.
    topk:   selected key positions [B, T, K], -1 padded (None where attention ran dense).
    indexer_kl: if a list, each layer appends its indexer KL (scalar; gradients reach only the indexer):
            against the dense attention in dense mode (stage 1), over the top-k set in sparse mode (stage 2).
    """

    routes: list = field(default_factory=list)
    topk: list = field(default_factory=list)
    indexer_kl: list | None = None  # pass [] to collect each layer's indexer KL (the DSA training loss)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.moe.n_dense_layers else MoE(cfg.dim, cfg.moe)

    def forward(self, x, ctx, cache=None, route=None, trace: Trace | None = None):
        x = x + self.attn(self.attn_norm(x), ctx, cache, None if trace is None else trace.topk,
                          None if trace is None else trace.indexer_kl)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            out, route = self.ffn(h, route)
        else:
            out, route = self.ffn(h), None
        if trace is not None:
            trace.routes.append(route)
        return x + out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Kept out of the state dict and out of dtype casts: frequencies stay fp32.
        self._freqs, self._rope_scale = rope.inv_freq(cfg.rope, cfg.mla.qk_rope_head_dim)
        self.init_weights()

    # -- construction ------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Every initialisation in one place.

        Linear, embedding, router and stacked expert weights: N(0, init_std). Projections that write
        into the residual stream (attention `wo`, MLP and expert `w2`) get init_std / sqrt(2 * n_layers)
        (GPT-2), so the residual variance does not grow with depth. RMSNorm / LayerNorm weights 1,
        LayerNorm bias 0, router correction bias 0.
        """
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5

        def normal_(t: torch.Tensor, s: float) -> None:
            if not t.is_meta:
                t.copy_(torch.randn(t.shape, generator=gen) * s)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                normal_(m.weight, std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, Gate):
                normal_(m.weight, std)
                m.bias.zero_()
            elif isinstance(m, MoE):
                normal_(m.w1, std)
                normal_(m.w3, std)
                normal_(m.w2, out_std)
        for m in self.modules():
            if isinstance(m, MLA):
                normal_(m.wo.weight, out_std)
            elif isinstance(m, MLP):
                normal_(m.w2.weight, out_std)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", **overrides) -> "Transformer":
        """Load a Hugging Face `DeepseekV32ForCausalLM` directory (config.json + safetensors)."""
        from .hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, **overrides)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write a directory that `transformers.DeepseekV32ForCausalLM.from_pretrained` loads."""
        from .hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    def set_attn_mode(self, mode: str) -> "Transformer":
        if mode not in ("dense", "sparse"):
            raise ValueError(f"attention mode must be 'dense' or 'sparse', got {mode!r}")
        self.cfg.attn_mode = mode
        return self

    def new_cache(self, batch: int, max_len: int | None = None) -> Cache:
        p = next(self.parameters())
        return Cache(self.cfg, batch, max_len or self.cfg.max_seq_len, dtype=p.dtype, device=p.device)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    # -- forward -----------------------------------------------------------------------------

    def context(self, B: int, T: int, start: int, doc_ids_BT: torch.Tensor | None, cache: Cache | None,
                device) -> AttnContext:
        """Positions, RoPE angles and the visible key range [ks, ke) of every new token."""
        if cache is not None and cache.lengths is not None:
            return self._ragged_context(T, cache, doc_ids_BT, device)
        pos_BT = (start + torch.arange(T, device=device)).expand(B, T)
        cos, sin = rope.cos_sin(self._freqs, pos_BT, self._rope_scale)
        ke_BT = pos_BT + 1
        if doc_ids_BT is None and (cache is None or start == 0):
            ks_BT = torch.zeros_like(pos_BT)
            plain = start == 0
        else:
            docs_BS = doc_ids_BT if doc_ids_BT is not None else torch.zeros(B, T, dtype=torch.long, device=device)
            if cache is not None:
                cache.doc_ids[:, start:start + T] = docs_BS
                docs_BS = cache.doc_ids[:, : start + T]
            # Segment start of every position: the last index where the document id changed.
            s = torch.arange(docs_BS.shape[1], device=device)
            boundary_BS = torch.ones_like(docs_BS, dtype=torch.bool)
            boundary_BS[:, 1:] = docs_BS[:, 1:] != docs_BS[:, :-1]
            ks_BT = torch.where(boundary_BS, s, 0).cummax(dim=1).values[:, start:start + T]
            plain = start == 0 and doc_ids_BT is None
        max_visible = start + T if doc_ids_BT is None and cache is None else int((ke_BT - ks_BT).max())
        return AttnContext(start, cos, sin, ks_BT, ke_BT, self.cfg.attn_mode == "sparse", plain, max_visible)

    def _ragged_context(self, T: int, cache: Cache, doc_ids_BT, device) -> AttnContext:
        """A ragged batch: row b's new tokens sit at [cache.lengths[b], + T) and see keys [0, position]."""
        if doc_ids_BT is not None:
            raise ValueError("doc_ids are not supported with a ragged cache (per-row lengths); "
                             "pack documents without a cache or decode them with a plain cache")
        pos_BT = torch.tensor(cache.lengths, device=device)[:, None] + torch.arange(T, device=device)
        cos, sin = rope.cos_sin(self._freqs, pos_BT, self._rope_scale)
        start = max(cache.lengths)
        return AttnContext(start, cos, sin, torch.zeros_like(pos_BT), pos_BT + 1, self.cfg.attn_mode == "sparse",
                           False, start + T, pos_BT)

    def hidden(self, input_ids: torch.Tensor, *, cache: Cache | None = None, doc_ids: torch.Tensor | None = None,
               routes: list | None = None, trace: Trace | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, d] (what the LM head reads)."""
        B, T = input_ids.shape
        start = cache.reserve(T, B) if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if routes is not None and len(routes) != len(self.layers):
            raise ValueError(f"routes has {len(routes)} entries; expected one per layer ({len(self.layers)})")
        ctx = self.context(B, T, start, doc_ids, cache, input_ids.device)
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, None if cache is None else cache.layers[i], None if routes is None else routes[i], trace)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, *, cache: Cache | None = None, doc_ids: torch.Tensor | None = None,
                routes: list | None = None, trace: Trace | None = None) -> torch.Tensor:
        """Logits [B, T, V].

        cache:   continue from the cached tokens (prefill from any offset, decode one or several tokens).
        doc_ids: [B, T] packing segment ids; attention and indexer never cross a segment boundary.
        routes:  per-layer expert ids to replay (Keep Routing), as recorded in `trace.routes`.
        trace:   a `Trace` to fill with this pass's routes and top-k sets.
        """
        return self.head(self.hidden(input_ids, cache=cache, doc_ids=doc_ids, routes=routes, trace=trace))
