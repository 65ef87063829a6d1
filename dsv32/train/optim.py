"""Training config, AdamW over named parameter groups, warm-up + cosine schedule, per-group clipping.

A `ParamGroup` names a slice of the model (by a predicate on the parameter name) with its own lr
multiplier, weight decay and max grad norm. The DSA stages use this to train and clip the lightning
indexer apart from the main model (V3.2 paper §2.1: the indexer's loss and gradients are kept separate):

    groups = [ParamGroup("indexer", lambda n: ".indexer." in n, max_grad_norm=1.0), ParamGroup("main")]

Each parameter goes to the first group whose `match` accepts its name (`match=None` accepts all).
Parameters that no group accepts are frozen (`requires_grad=False`). Inside each group, norms, biases
and every 1-D parameter get no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    steps: int = 100                   # optimizer steps in the whole run (the schedule's length)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0             # default max grad norm per group; 0 disables clipping
    grad_accum: int = 1                # micro-batches per optimizer step
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0                # 0: only at the end
    out_dir: str = "runs/train"
    bf16: bool = False                 # torch.autocast(bfloat16) around forward + loss

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = [
            ("lr", self.lr >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "must be two numbers in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("seq_len", self.seq_len >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("ckpt_every", self.ckpt_every >= 0, "must be >= 0 (0: only at the end)"),
            ("out_dir", bool(str(self.out_dir)), "must be a non-empty path"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} {why}; fix the value passed for {name}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class ParamGroup:
    name: str
    match: Callable[[str], bool] | None = None   # None: every parameter not taken by an earlier group
    lr_mult: float = 1.0
    weight_decay: float | None = None            # None: TrainConfig.weight_decay
    max_grad_norm: float | None = None           # None: TrainConfig.grad_clip; 0: no clipping


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name


def build_optimizer(model: nn.Module, cfg: TrainConfig, groups: list[ParamGroup] | None = None) -> torch.optim.AdamW:
    """AdamW with two torch param groups (decay / no decay) per named group.

    Each torch group carries `group` (the name), `lr_mult` and `max_grad_norm`, used by `set_lr`
    and `clip_grads`. Parameters matched by no group are frozen.
    """
    groups = groups or [ParamGroup("main")]
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter group names must be unique, got {names}; rename the duplicates")
    taken: dict[str, list[tuple[str, nn.Parameter]]] = {g.name: [] for g in groups}
    for pname, p in model.named_parameters():
        g = next((g for g in groups if g.match is None or g.match(pname)), None)
        if g is None:
            p.requires_grad_(False)
        else:
            taken[g.name].append((pname, p))
    torch_groups = []
    for g in groups:
        if not taken[g.name]:
            raise ValueError(f"parameter group {g.name!r} matches no parameter; fix its `match` or drop the group")
        wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
        clip = cfg.grad_clip if g.max_grad_norm is None else g.max_grad_norm
        for p in (p for _, p in taken[g.name]):
            p.requires_grad_(True)
        decay = [p for n, p in taken[g.name] if not _no_decay(n, p)]
        plain = [p for n, p in taken[g.name] if _no_decay(n, p)]
        for params, w in ((decay, wd), (plain, 0.0)):
            if params:
                torch_groups.append({"params": params, "weight_decay": w, "group": g.name,
                                     "lr_mult": g.lr_mult, "max_grad_norm": clip})
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on cfg.lr for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every group's lr for `step`; returns the base lr (before group multipliers)."""
    lr = cfg.lr * lr_factor(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def clip_grads(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Clip each named group's gradients to its own max norm; returns the pre-clip norm of each group."""
    by_name: dict[str, tuple[list[torch.Tensor], float]] = {}
    for g in optimizer.param_groups:
        params, clip = by_name.setdefault(g.get("group", "main"), ([], g.get("max_grad_norm", 0.0)))
        params.extend(p for p in g["params"] if p.grad is not None)
    norms = {}
    for name, (params, clip) in by_name.items():
        if not params:
            norms[name] = 0.0
            continue
        max_norm = clip if clip and clip > 0 else float("inf")
        norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return norms
