"""The DeepSeek-V3.2 lightning indexer (dsa-anchors.md §1.2-1.3, consolidated in §1.9).

    I[t,s] = sum_h w[t,h] * ReLU(q~[t,h] . k~[s])                                   (fp32 accumulate)
    q~ = Had(RoPE_half(W_qb . qr_t)),  k~ = Had(RoPE_half(LN(W_k . x_s))),  w = (W_w . x_t) * H^-1/2 * D^-1/2

`qr` is MLA's normalised q-latent, `x` the attention-normed hidden state. RoPE covers the *first*
`qk_rope_head_dim` dims (MLA rotates its last dims). With FP8 simulation q and k are rounded to
e4m3 with one scale per (token, head) for q, folded into w, and one per token for k (kept beside the
cached key), as DeepSeek's `fp8_index` computes it.

Legend: B batch, T tokens, H indexer heads, D indexer head dim.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rope
from .config import IndexerConfig
from .precision import KeepFP32

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.lru_cache(maxsize=16)
def hadamard_matrix(d: int, device: str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [d, d] in fp32 (d a power of 2), symmetric: H @ H = I."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-2 size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(d)).float().to(device)


def fp8_fake_quant(x: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round `x` to e4m3 with one scale per row of the last dim. Returns (values on the FP8 grid, scale).

    `values * scale ~= x`. The scale is `max(amax, 1e-4) / 448` (DeepSeek `act_quant`), rounded up to a
    power of 2 when `pow2` ("ue8m0"). Gradients pass straight through the rounding (detached scale).
    """
    amax = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-4)
    scale = amax / FP8_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    unit = x.float() / scale
    fp8 = unit.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return unit + (fp8 - unit).detach(), scale.squeeze(-1)


class Indexer(KeepFP32):
    # DeepSeek keeps `weights_proj` in fp32 even in a bf16 model (so does transformers:
    # `_keep_in_fp32_modules`); bf16 head weights raise the tie rate (sglang #23856).
    _fp32 = ("weights_proj.weight",)

    def __init__(self, dim: int, q_lora_rank: int, rope_dim: int, cfg: IndexerConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim, self.rope_dim = cfg.n_heads, cfg.head_dim, rope_dim
        self.wq_b = nn.Linear(q_lora_rank, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(dim, cfg.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6)  # with bias, computed in fp32
        self.weights_proj = nn.Linear(dim, cfg.n_heads, bias=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pe, rest = x[..., : self.rope_dim], x[..., self.rope_dim:]
        x = torch.cat((rope.apply(pe, cos, sin, self.cfg.rope_layout), rest), dim=-1)
        if self.cfg.hadamard:
            x = (x.float() @ hadamard_matrix(self.head_dim, str(x.device))).to(x.dtype)
        return x

    def keys(self, x_BTd: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Index keys [B, T, D] for the cache, and their per-token FP8 scales [B, T] (None unless FP8)."""
        ln = self.k_norm
        k = F.layer_norm(self.wk(x_BTd).float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        k_BTD = self._rotate(k.to(x_BTd.dtype), cos, sin)
        if self.cfg.quant == "fp8_sim":
            return fp8_fake_quant(k_BTD, self.cfg.pow2_scales)
        return k_BTD, None

    def queries(self, x_BTd: torch.Tensor, qr_BTq: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries [B, T, H, D] and head weights [B, T, H] (fp32, scales folded in)."""
        B, T, _ = x_BTd.shape
        q_BTHD = self._rotate(self.wq_b(qr_BTq).view(B, T, self.n_heads, self.head_dim), cos, sin)
        w_BTH = F.linear(x_BTd.float(), self.weights_proj.weight.float())
        w_BTH = w_BTH * (self.n_heads ** -0.5) * (self.head_dim ** -0.5)
        if self.cfg.quant == "fp8_sim":
            q_BTHD, q_scale_BTH = fp8_fake_quant(q_BTHD, self.cfg.pow2_scales)
            w_BTH = w_BTH * q_scale_BTH
        return q_BTHD, w_BTH
