"""The GRPO loss with DeepSeek-V3.2's stability fixes as small pure functions (rl-distill-anchors.md §1.2–1.4, §6.2).

Shapes: B completions, T completion positions (right-padded); `mask_BT` is 1 on tokens the policy generated
(0 on padding and tool outputs). Log-probs are of the sampled tokens:

    logps_BT          log π_θ(o_t)   with gradient (recomputed by the trainer over the Keep Sampling Mask)
    old_logps_BT      log π_old(o_t) detached: the policy that made this rollout, as the trainer computes it
    sampler_logps_BT  the inference engine's own log-probs (OPSM's π_old, V3.2 Eq. 9); defaults to old_logps_BT
    ref_logps_BT      log π_ref(o_t) of the frozen reference

    ratio_t   = exp(lp − lp_old)
    pg_t      = −min(ratio·A, clip(ratio, 1 − ε_low, 1 + ε_high)·A)                  clipped surrogate (Eq. 5)
    OPSM_i    = 0 if A_i < 0 and mean_t(lp_samp − sg(lp)) > δ else 1                 policy term only (Eq. 8–9)
    k3_t      = exp(lp_ref − lp) − (lp_ref − lp) − 1
    kl_t      = ratio_t · k3_t   (unbiased, ratio NOT detached: ∇ = ratio·(lp − lp_ref)·∇lp)     (Eq. 7)
    loss_t    = OPSM_i · pg_t + β_i · kl_t − c_H · H_t

Aggregations (§2.1–2.3): `seq_mean_token_mean` (V3.2 / DeepSeekMath / TRL "grpo") averages tokens within
each completion, then completions; `token_mean` (DAPO / TRL "bnpo"; "dapo" with a global `normalizer`)
averages over all tokens; `dr_grpo` divides the token sum by the constant B · L_max.

    loss, metrics = grpo_loss(logps, old_logps, adv, mask, LossConfig(beta=0.001, opsm_delta=0.5),
                              sampler_logps=samp, ref_logps=ref)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "dr_grpo")


@dataclass
class LossConfig:
    eps_low: float = 0.2                 # clip range below 1 (DAPO Clip-Higher keeps 0.2 here)
    eps_high: float = 0.28               # clip range above 1 (DAPO: 0.28)
    beta: float = 0.0                    # KL weight when no per-sequence β is passed (V3.2: weak or none for math)
    unbiased_kl: bool = True             # V3.2 Eq. 7 (k3 × ratio); False: plain k3 (DeepSeekMath)
    opsm_delta: float | None = None      # off-policy sequence masking threshold δ; None disables OPSM
    aggregation: str = "seq_mean_token_mean"
    max_len: int | None = None           # Dr. GRPO's constant L_max (the rollout's max_tokens)
    entropy_coef: float = 0.0            # c_H: a positive value rewards entropy

    def __post_init__(self):
        checks = [
            ("eps_low", 0 <= self.eps_low < 1, "must be in [0, 1)"),
            ("eps_high", self.eps_high >= 0, "must be >= 0"),
            ("beta", self.beta >= 0, "must be >= 0"),
            ("opsm_delta", self.opsm_delta is None or self.opsm_delta >= 0, "must be >= 0 or None (off)"),
            ("aggregation", self.aggregation in AGGREGATIONS, f"must be one of {', '.join(AGGREGATIONS)}"),
            ("max_len", self.aggregation != "dr_grpo" or (self.max_len or 0) >= 1,
             "must be set (>= 1) for aggregation='dr_grpo' (use the rollout's max_tokens)"),
            ("entropy_coef", self.entropy_coef >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"LossConfig.{name}={getattr(self, name)!r} {why}")

    def to_dict(self) -> dict:
        return asdict(self)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with padding set to 0 (multiplying would keep a NaN or inf sitting in the padding)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return _masked(x_BT, mask_BT).sum() / mask_BT.sum().clamp(min=1)


def seq_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-completion token mean [B] (0 for an empty completion)."""
    return _masked(x_BT, mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)


def clipped_surrogate(log_ratio_BT: torch.Tensor, adv: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token −min(r·A, clip(r)·A) and the low/high clip indicators (TRL's definitions: a clip that binds).
    adv: one advantage per completion [B], or one per token [B, T] (process supervision)."""
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = adv if adv.dim() == 2 else adv[:, None]
    clipped_BT = torch.clamp(ratio_BT, 1 - eps_low, 1 + eps_high)
    loss_BT = -torch.min(ratio_BT * adv_BT, clipped_BT * adv_BT)
    low_BT = (ratio_BT < 1 - eps_low) & (adv_BT < 0)
    high_BT = (ratio_BT > 1 + eps_high) & (adv_BT > 0)
    return loss_BT, low_BT, high_BT


def k3(logps_BT: torch.Tensor, ref_logps_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π_θ‖π_ref) per token: exp(d) − d − 1 with d = lp_ref − lp (≥ 0)."""
    d = ref_logps_BT - logps_BT
    return torch.exp(d) - d - 1


def unbiased_kl(logps_BT: torch.Tensor, ref_logps_BT: torch.Tensor, old_logps_BT: torch.Tensor) -> torch.Tensor:
    """V3.2 Eq. 7: k3 × π_θ/π_old, the ratio differentiable: the gradient is ratio·(lp − lp_ref)·∇lp."""
    return torch.exp(logps_BT - old_logps_BT) * k3(logps_BT, ref_logps_BT)


def off_policy_mask(adv_B: torch.Tensor, logps_BT: torch.Tensor, sampler_logps_BT: torch.Tensor,
                    mask_BT: torch.Tensor, delta: float) -> torch.Tensor:
    """OPSM keep mask [B] (1 keep, 0 drop): drop iff A < 0 and mean_t(lp_samp − sg(lp)) > δ over real tokens.

    A NaN sampler log-prob (a token the sampler could not score) gives no evidence and counts as 0, as in TRL.
    """
    kl_BT = torch.nan_to_num(sampler_logps_BT - logps_BT.detach(), nan=0.0)
    seq_kl_B = seq_mean(kl_BT, mask_BT)
    return ((adv_B >= 0) | (seq_kl_B <= delta)).to(logps_BT.dtype)


def token_entropy(logprobs_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] of distributions given as log-probs (−inf outside a Keep Sampling Mask set counts 0)."""
    p = logprobs_BTV.exp()   # 0 * -inf: the where sits inside the product, so no NaN reaches the gradient either
    return -(p * torch.where(p > 0, logprobs_BTV, torch.zeros((), dtype=p.dtype))).sum(-1)


def adaptive_entropy_coef(coef: float, entropy: float, target: float, delta: float = 0.005, lo: float = 0.0,
                          hi: float = 0.1) -> float:
    """Skywork-OR1 / TRL `use_adaptive_entropy`: raise the entropy coefficient by `delta` while the measured
    entropy is at or below `target` (nats), lower it otherwise, within [lo, hi] (rl-distill-anchors.md §6.5 #14)."""
    return min(coef + delta, hi) if entropy <= target else max(coef - delta, lo)


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, aggregation: str, max_len: int | None = None,
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

    normalizer (token_mean and dr_grpo only) replaces this batch's denominator, so that micro-batches of
    one optimizer step, each divided by the step's total, sum to the loss of the whole step (DAPO's global
    token mean; Dr. GRPO's B_total · L_max).
    """
    total = _masked(loss_BT, mask_BT)
    if aggregation == "seq_mean_token_mean":
        return seq_mean(loss_BT, mask_BT).mean()
    if aggregation == "token_mean":
        denom = mask_BT.sum().clamp(min=1) if normalizer is None else normalizer
        return total.sum() / denom
    if aggregation == "dr_grpo":
        if normalizer is None and not max_len:
            raise ValueError("aggregate: aggregation='dr_grpo' needs max_len (L_max) or a normalizer")
        return total.sum() / (normalizer if normalizer is not None else loss_BT.shape[0] * max_len)
    raise ValueError(f"aggregation {aggregation!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")


def grpo_loss(logps_BT: torch.Tensor, old_logps_BT: torch.Tensor, adv_B: torch.Tensor, mask_BT: torch.Tensor,
              cfg: LossConfig, *, sampler_logps_BT: torch.Tensor | None = None,
              ref_logps_BT: torch.Tensor | None = None, beta_B: torch.Tensor | None = None,
              entropy_BT: torch.Tensor | None = None, normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The scalar loss (minimise it) and a metrics dict of floats (TRL/verl names).

    adv_B: one advantage per completion [B], or one per token [B, T] (process supervision; OPSM then reads the
        sign of the completion's mean token advantage).
    beta_B: per-completion KL weight (β per domain); None uses cfg.beta for every completion.
    entropy_BT: per-token entropy of π_θ (with gradient) for the optional entropy term and the `entropy` metric.
    """
    if logps_BT.shape != old_logps_BT.shape or logps_BT.shape != mask_BT.shape:
        raise ValueError(f"grpo_loss: logps {tuple(logps_BT.shape)}, old_logps {tuple(old_logps_BT.shape)} and "
                         f"mask {tuple(mask_BT.shape)} must have the same [B, T] shape")
    if adv_B.shape not in (logps_BT.shape[:1], logps_BT.shape):
        raise ValueError(f"grpo_loss: advantages {tuple(adv_B.shape)} must be [B]={logps_BT.shape[0]}, one per "
                         f"completion, or [B, T]={tuple(logps_BT.shape)}, one per token")
    mask_BT = mask_BT.to(logps_BT.dtype)
    adv = adv_B.to(logps_BT.dtype)                  # [B] or [B, T]
    adv_B = adv if adv.dim() == 1 else seq_mean(adv, mask_BT)   # per completion: OPSM's sign, β's shape
    old_logps_BT = old_logps_BT.detach()
    log_ratio_BT = _masked(logps_BT - old_logps_BT, mask_BT)
    pg_BT, low_BT, high_BT = clipped_surrogate(log_ratio_BT, adv, cfg.eps_low, cfg.eps_high)
    metrics: dict = {}

    if cfg.opsm_delta is not None:
        samp = old_logps_BT if sampler_logps_BT is None else sampler_logps_BT.detach()
        keep_B = off_policy_mask(adv_B, logps_BT, samp, mask_BT, cfg.opsm_delta)
        pg_BT = pg_BT * keep_B[:, None]
        real_B = mask_BT.sum(-1) > 0
        metrics["opsm/masked_frac"] = float((1 - keep_B)[real_B].mean()) if real_B.any() else 0.0
    loss_BT = pg_BT
    policy_loss = aggregate(pg_BT.detach(), mask_BT, cfg.aggregation, cfg.max_len, normalizer)

    beta_B = torch.full_like(adv_B, cfg.beta) if beta_B is None else beta_B.to(logps_BT.dtype)
    if bool((beta_B != 0).any()):
        if ref_logps_BT is None:
            raise ValueError("grpo_loss: β > 0 needs ref_logps_BT (the reference model's log-probs)")
        ref_logps_BT = _masked(ref_logps_BT.detach(), mask_BT)
        lp = _masked(logps_BT, mask_BT)
        old = _masked(old_logps_BT, mask_BT)
        kl_BT = unbiased_kl(lp, ref_logps_BT, old) if cfg.unbiased_kl else k3(lp, ref_logps_BT)
        loss_BT = loss_BT + beta_B[:, None] * kl_BT
        metrics["kl"] = float(masked_mean(kl_BT.detach(), mask_BT))
    if entropy_BT is not None:
        metrics["entropy"] = float(masked_mean(entropy_BT.detach(), mask_BT))
        if cfg.entropy_coef:
            loss_BT = loss_BT - cfg.entropy_coef * entropy_BT
    loss = aggregate(loss_BT, mask_BT, cfg.aggregation, cfg.max_len, normalizer)

    ratio_BT = log_ratio_BT.detach().exp()
    real = mask_BT.bool()
    metrics.update({
        "loss": float(loss.detach()),
        "policy_loss": float(policy_loss),
        "clip_ratio/low_mean": float(masked_mean(low_BT.to(mask_BT.dtype), mask_BT)),
        "clip_ratio/high_mean": float(masked_mean(high_BT.to(mask_BT.dtype), mask_BT)),
        "clip_ratio/region_mean": float(masked_mean((low_BT | high_BT).to(mask_BT.dtype), mask_BT)),
        "is/ratio_mean": float(masked_mean(ratio_BT, mask_BT)),
        "is/ratio_max": float(ratio_BT[real].max()) if real.any() else 1.0,
        "num_tokens": float(mask_BT.sum()),
    })
    if sampler_logps_BT is not None:  # k1 estimate of KL(π_sampler ‖ π_θ) on the sampled tokens
        gap = torch.nan_to_num(sampler_logps_BT.detach() - logps_BT.detach(), nan=0.0)
        metrics["mismatch/kl"] = float(masked_mean(gap, mask_BT))
    return loss, metrics
