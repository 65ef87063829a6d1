"""Rotary position embedding, with YaRN, in the two layouts DeepSeek-V3.2 uses.

MLA rotates *interleaved* pairs `(x[2i], x[2i+1])` on the last `qk_rope_head_dim` dims; the lightning
indexer rotates *half-split* pairs `(x[i], x[i + d/2])` on its first dims (DeepSeek-V3.2-Exp commit
8631a81 "fix indexer rope"; dsa-anchors.md §1.4). Both share one frequency table.

Shapes: `cos`, `sin` are `[B, T, d/2]` (one angle per pair); `x` is `[B, T, (H,) d]`.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[dim/2]` and the cos/sin scale ("attention factor").

    YaRN follows DeepSeek-V3 `precompute_freqs_cis` (= transformers `_compute_yarn_parameters`): the
    low-frequency dims are interpolated by `factor`, the high-frequency ones kept, a linear ramp between.
    """
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if rope.scaling != "yarn":
        return 1.0 / pos_freqs, 1.0

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(rope.original_max_position / (n_rot * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate); 0: interpolate by `factor`
    freqs = 1.0 / (rope.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    attention_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return freqs, attention_factor


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions `[B, T]` (absolute) -> cos, sin `[B, T, d/2]` in fp32."""
    angles = positions.to(torch.float32)[..., None] * freqs.to(positions.device)
    return angles.cos() * scale, angles.sin() * scale


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # cos/sin are [B, T, d/2]; insert head dims between T and d so they broadcast against x.
    return c.view(*c.shape[:2], *([1] * (x.dim() - 3)), c.shape[-1])


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i; output keeps the interleaved layout."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = _bcast(cos, x), _bcast(sin, x)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)


def apply_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by angle i (NeoX / Llama `rotate_half`)."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = _bcast(cos, x), _bcast(sin, x)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    return apply_interleaved(x, cos, sin) if layout == "interleaved" else apply_half_split(x, cos, sin)
