"""The ideal speed-up of DSA over dense MLA for given shapes: what the bench's measured ratios are held against.

Two bounds per case (dsa-anchors.md §3.4, §7.3):

- `attn`: the attention cores only, as the spec states them.
  - prefill / train (FLOP-bound): dense runs MHA mode, one (query, key) pair costs 2·H·(N+P+V) FLOPs
    (q·k over N+P dims, p·v over V); DSA runs absorbed (MQA) mode over the latent, a pair costs
    2·H·(2R+P) (q_lat·kv + q_pe·pe, then p·kv). c = (2R+P)/(N+P+V) is that per-pair cost ratio
    (1088/320 = 3.4 in V3 proportions; 544/160 = 3.4 for `small`). Dense causal prefill visits
    L(L+1)/2 pairs, DSA Σ_t min(k, t+1) ≈ L·k, so the ratio is ≈ (L/2)/(k·c).
  - decode (bound by bytes read per step): dense reads the latent cache, (R+P) values per token;
    DSA reads the index keys (d_I values per token, or d_I bytes + a 4-byte scale in FP8) plus
    k latents.
- `layer`: everything the layer computes (or reads): the projections both modes share, MHA mode's
  per-token key/value expansion (W_UK, W_UV) against absorbed mode's folding of W_UK into q and
  W_UV into the output, and the lightning indexer (its query projections and its L(L+1)/2 causal
  scores, 2·H_I·d_I FLOPs each). Train: matmuls cost 3× their forward (forward + two backward
  products), except the indexer and its keys, which get no gradient from the attention output.
  Decode: the weights read each step count on both sides.

When no query has more than k visible keys the layer runs its dense path, so both bounds are 1.
Head dims are the model's: the zero padding `_mha` adds to v for SDPA's flash kernel is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig


@dataclass(frozen=True)
class Shapes:
    d: int
    H: int
    N: int
    P: int
    V: int
    R: int
    q_rank: int
    HI: int
    DI: int
    hadamard: bool
    index_key_bytes_per_value: float  # 1 in an FP8 index cache, else the activation dtype's size
    index_scale_bytes: int  # 4 when FP8 simulation keeps a per-token fp32 scale

    @classmethod
    def of(cls, cfg: ModelConfig, dtype_bytes: int = 2) -> "Shapes":
        m, ix = cfg.mla, cfg.indexer
        return cls(cfg.dim, m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank,
                   m.q_lora_rank, ix.n_heads, ix.head_dim, ix.hadamard, 1 if ix.cache_fp8 else dtype_bytes,
                   4 if ix.quant == "fp8_sim" else 0)

    # FLOPs of one (query, key) pair in each mode, all heads
    @property
    def mha_pair(self) -> int:
        return 2 * self.H * (self.N + self.P + self.V)

    @property
    def absorbed_pair(self) -> int:
        return 2 * self.H * (2 * self.R + self.P)

    @property
    def c(self) -> float:
        """Absorbed-mode pair cost over MHA-mode pair cost."""
        return self.absorbed_pair / self.mha_pair


def causal_pairs(L: int) -> int:
    return L * (L + 1) // 2


def sparse_pairs(L: int, k: int) -> int:
    """Σ_{t=1..L} min(k, t): pairs DSA attends to in a causal prefill of L tokens."""
    return causal_pairs(L) if L <= k else k * (k + 1) // 2 + (L - k) * k


def _flops(s: Shapes, L: int, k: int) -> dict[str, float]:
    """Per-sequence forward FLOPs of the layer's parts for a causal prefill of L tokens."""
    had = 2 * s.DI * s.DI if s.hadamard else 0
    return {
        # both modes, with gradients: wq_a, wq_b, wkv_a, wo
        "proj": L * (2 * s.d * s.q_rank + 2 * s.q_rank * s.H * (s.N + s.P) + 2 * s.d * (s.R + s.P)
                     + 2 * s.H * s.V * s.d),
        # both modes, forward only: the indexer keys (written to the cache in dense mode too)
        "index_keys": L * (2 * s.d * s.DI + had),
        # MHA mode: expand the latent into per-head keys and values; the causal attention core
        "expand": L * 2 * s.R * s.H * (s.N + s.V),
        "mha_core": causal_pairs(L) * s.mha_pair,
        # absorbed mode: fold W_UK into q and W_UV into the output; the sparse core
        "absorb": L * (2 * s.H * s.N * s.R + 2 * s.H * s.R * s.V),
        "sparse_core": sparse_pairs(L, k) * s.absorbed_pair,
        # the indexer's queries and head weights, and its causal scores (no gradient)
        "index_queries": L * (2 * s.q_rank * s.HI * s.DI + 2 * s.d * s.HI + s.HI * had),
        "index_scores": causal_pairs(L) * 2 * s.HI * s.DI,
    }


def prefill_bounds(s: Shapes, L: int, k: int, train: bool = False) -> dict[str, float]:
    if L <= k:
        return {"attn": 1.0, "layer": 1.0, "kind": "flops"}
    f = _flops(s, L, k)
    g = 3 if train else 1  # a matmul's backward is two more of the same size
    dense = g * (f["proj"] + f["expand"] + f["mha_core"]) + f["index_keys"]
    dsa = g * (f["proj"] + f["absorb"] + f["sparse_core"]) + f["index_keys"] + f["index_queries"] + f["index_scores"]
    return {"attn": f["mha_core"] / f["sparse_core"], "layer": dense / dsa, "kind": "flops"}


def decode_bounds(s: Shapes, L: int, k: int, batch: int, dtype_bytes: int = 2) -> dict[str, float]:
    """One new token after L cached ones: bytes read per step (the new token sees L + 1 keys)."""
    S = L + 1
    if S <= k:
        return {"attn": 1.0, "layer": 1.0, "kind": "bytes"}
    e = dtype_bytes
    latent = (s.R + s.P) * e
    dense_attn = S * latent
    dsa_attn = S * (s.DI * s.index_key_bytes_per_value + s.index_scale_bytes) + k * latent
    w_shared = e * (s.d * s.q_rank + s.q_rank * s.H * (s.N + s.P) + s.d * (s.R + s.P) + s.R * s.H * (s.N + s.V)
                    + s.H * s.V * s.d + s.d * s.DI)
    w_index_q = e * s.q_rank * s.HI * s.DI + 4 * s.d * s.HI  # weights_proj stays fp32
    return {"attn": dense_attn / dsa_attn,
            "layer": (batch * dense_attn + w_shared) / (batch * dsa_attn + w_shared + w_index_q), "kind": "bytes"}


def bounds(cfg: ModelConfig, phase: str, L: int, k: int, batch: int, dtype_bytes: int = 2) -> dict[str, float]:
    s = Shapes.of(cfg, dtype_bytes)
    if phase == "decode":
        return decode_bounds(s, L, k, batch, dtype_bytes)
    return prefill_bounds(s, L, k, train=phase == "train")
