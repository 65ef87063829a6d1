"""Feed-forward layers: the dense SwiGLU MLP and DeepSeekMoE.

DeepSeekMoE (DeepSeek-V3 §2.1.2): shared experts always run; routed experts are chosen per token from
sigmoid affinities plus a load-balancing bias `e_score_correction_bias` (the bias steers selection only,
the gating weights use the raw sigmoid scores), limited to the `n_limited_groups` best groups (a group's
score is the sum of its two best experts), optionally renormalised, times `route_scale`.

The chosen experts can be returned and replayed: RL's Keep Routing trains on the routes the sampler used.

Legend: N tokens (B*T flattened), E routed experts, k experts per token, d model dim, I expert hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig
from .precision import KeepFP32


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). HF names: gate_proj = w1, down_proj = w2, up_proj = w3."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(KeepFP32):
    """Router: sigmoid scores, bias-corrected group-limited top-k. Weight and bias stay fp32."""

    _fp32 = ("weight", "bias")

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim))
        # Updated by aux-loss-free load balancing, not by gradients: a buffer, saved with the weights.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x_Nd: torch.Tensor, route_Nk: torch.Tensor | None = None):
        """Returns gating weights [N, k] (fp32) and expert ids [N, k]; `route_Nk` replays given ids."""
        c = self.cfg
        scores_NE = F.linear(x_Nd.float(), self.weight.float()).sigmoid()
        if route_Nk is None:
            choice_NE = scores_NE + self.bias
            if c.n_expert_groups > 1:
                N = x_Nd.shape[0]
                groups_NGe = choice_NE.view(N, c.n_expert_groups, -1)
                group_score_NG = groups_NGe.topk(2, dim=-1).values.sum(-1)
                keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
                keep_NG.scatter_(1, group_score_NG.topk(c.n_limited_groups, dim=-1).indices, True)
                choice_NE = groups_NGe.masked_fill(~keep_NG[..., None], float("-inf")).view(N, -1)
            route_Nk = choice_NE.topk(c.n_activated_experts, dim=-1).indices
        weights_Nk = scores_NE.gather(1, route_Nk)
        if c.norm_topk_prob:
            weights_Nk = weights_Nk / (weights_Nk.sum(-1, keepdim=True) + 1e-20)
        return weights_Nk * c.route_scale, route_Nk


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        E, I = cfg.n_routed_experts, cfg.moe_inter_dim
        self.gate = Gate(dim, cfg)
        # Experts stacked: w1/w3 [E, I, d], w2 [E, d, I] (one tensor each; split per expert only on disk).
        self.w1 = nn.Parameter(torch.empty(E, I, dim))
        self.w2 = nn.Parameter(torch.empty(E, dim, I))
        self.w3 = nn.Parameter(torch.empty(E, I, dim))
        self.shared = MLP(dim, I * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None

    def forward(self, x_BTd: torch.Tensor, route_BTk: torch.Tensor | None = None):
        """Returns (output [B, T, d], expert ids [B, T, k])."""
        B, T, d = x_BTd.shape
        x_Nd = x_BTd.reshape(-1, d)
        route = None if route_BTk is None else route_BTk.reshape(B * T, -1)
        weights_Nk, route_Nk = self.gate(x_Nd, route)
        k = route_Nk.shape[1]
        # Group the (token, slot) pairs by expert, run each expert once on its tokens.
        flat = route_Nk.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()
        token_of = order // k
        y_Nd = torch.zeros_like(x_Nd)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start:start + n]
            h = x_Nd.index_select(0, tok)
            h = F.silu(h @ self.w1[e].t()) * (h @ self.w3[e].t())
            h = (h @ self.w2[e].t()) * weights_Nk.reshape(-1)[order[start:start + n], None]
            y_Nd.index_add_(0, tok, h.to(y_Nd.dtype))
            start += n
        if self.shared is not None:
            y_Nd = y_Nd + self.shared(x_Nd)
        return y_Nd.view(B, T, d), route_Nk.view(B, T, k)
