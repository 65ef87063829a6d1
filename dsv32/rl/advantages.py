"""Group-relative advantages for GRPO (rl-distill-anchors.md §1.2, §2.1, §2.5, §6.2).

One scalar reward R_i per completion; completions that answer the same prompt share a `uid` and form a
group. The advantage is broadcast over every token of the completion by the loss.

    group_mean       A_i = R_i − mean_g(R)                       DeepSeek-V3.2 Eq. 5 (no std; the default)
    group_mean_std   A_i = (R_i − mean_g(R)) / (std_g(R) + eps)  DeepSeekMath / TRL scale_rewards="group"
    batch_std        A_i = (R_i − mean_g(R)) / (std_batch + eps) TRL scale_rewards="batch"
    rloo             A_i = R_i − mean_{j≠i, j∈g}(R_j)            leave-one-out baseline

Rules the pitfall tests pin (§6.5 items 1, 2, 10): groups are formed by uid, not by position; a `None`
reward (not applicable) is left out of every mean and std and gets advantage 0; a group whose valid
rewards are all equal gets exactly 0 (never NaN); a group with fewer than two valid rewards gets 0.
std is the unbiased (n−1) standard deviation, as torch.std and TRL's `nanstd`.

    adv, stats = group_advantages([1.0, 0.0, None, 0.5], ["a", "a", "b", "b"])
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

METHODS = ("group_mean", "group_mean_std", "batch_std", "rloo")


def _as_tensor(rewards) -> torch.Tensor:
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to(torch.float64).flatten()
    return torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float64)


def group_ids(uids: Sequence[Hashable]) -> torch.Tensor:
    """Map arbitrary uids to dense group indices 0..n_groups-1 in order of first appearance."""
    index: dict = {}
    return torch.tensor([index.setdefault(u, len(index)) for u in uids], dtype=torch.long)


def group_advantages(rewards, uids: Sequence[Hashable], method: str = "group_mean",
                     eps: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """Advantages [N] (float32) and stats (`reward/mean`, `reward/std`, `frac_reward_zero_std`, ...).

    rewards: N floats or None (None = no reward applies), or a tensor with NaN for None.
    uids: N hashables; equal uid = same prompt = same group.
    """
    if method not in METHODS:
        raise ValueError(f"advantage method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    r = _as_tensor(rewards)
    if len(uids) != r.numel():
        raise ValueError(f"group_advantages: {r.numel()} rewards but {len(uids)} uids; pass one uid per completion")
    if torch.isinf(r).any():
        raise ValueError("group_advantages: a reward is infinite; reward functions must return finite floats or None")
    gid = group_ids(uids)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count_G = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, valid.double())
    sum_G = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, r0)
    mean_G = sum_G / count_G.clamp(min=1)
    dev = torch.where(valid, r - mean_G[gid], torch.zeros_like(r))
    sq_G = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, dev * dev)
    std_G = (sq_G / (count_G - 1).clamp(min=1)).sqrt()
    # "All equal" is decided on the values themselves, so float noise in the mean cannot leak a tiny advantage.
    max_G = torch.zeros(n_groups, dtype=torch.float64).scatter_reduce_(
        0, gid, torch.where(valid, r, torch.full_like(r, -torch.inf)), "amax", include_self=False)
    min_G = torch.zeros(n_groups, dtype=torch.float64).scatter_reduce_(
        0, gid, torch.where(valid, r, torch.full_like(r, torch.inf)), "amin", include_self=False)
    flat_G = (max_G == min_G) | (count_G < 2)

    if method == "group_mean":
        adv = dev
    elif method == "group_mean_std":
        adv = dev / (std_G[gid] + eps)
    elif method == "batch_std":
        batch_std = r[valid].std() if int(valid.sum()) > 1 else torch.tensor(0.0, dtype=torch.float64)
        adv = dev / (batch_std + eps)
    else:  # rloo: R_i − (sum − R_i)/(n − 1) = n/(n − 1) · (R_i − mean)
        n = count_G[gid]
        adv = dev * n / (n - 1).clamp(min=1)
    adv = torch.where(valid & ~flat_G[gid], adv, torch.zeros_like(adv))

    has_valid_G = count_G > 0
    stats = {
        "reward/mean": float(r[valid].mean()) if valid.any() else float("nan"),
        "reward/std": float(r[valid].std()) if int(valid.sum()) > 1 else 0.0,
        "frac_reward_zero_std": float(flat_G[has_valid_G].double().mean()) if has_valid_G.any() else 1.0,
        "frac_reward_none": float((~valid).double().mean()) if r.numel() else 0.0,
        "num_groups": n_groups,
    }
    return adv.float(), stats


def process_advantages(step_rewards: Sequence[Sequence[float]], uids: Sequence[Hashable]) -> list[list[float]]:
    """Process supervision (DeepSeekMath, rl-distill-anchors.md §2.1): per completion, one advantage per step,
    Â_j = Σ_{steps k ≥ j} r̃_k with r̃ = (r − mean) / std over every step reward of the group. A token takes the
    advantage of the first step that ends at or after it, so a wrong step is blamed on its own tokens and on
    those before it, never on the right steps after it. The outcome is the last step.

    Groups are formed by uid; a group whose step rewards are all equal (or that has fewer than two) gets 0.

        >>> process_advantages([[1, 0], [1, 1]], ["a", "a"])   # mean 0.75, std 0.5
        [[-1.0, -1.5], [1.0, 0.5]]
    """
    if len(step_rewards) != len(uids):
        raise ValueError(f"process_advantages: {len(step_rewards)} completions but {len(uids)} uids")
    by_group: dict = {}
    for rs, u in zip(step_rewards, uids):
        by_group.setdefault(u, []).extend(float(r) for r in rs)
    stats = {}
    for u, rs in by_group.items():
        t = torch.tensor(rs, dtype=torch.float64)
        flat = t.numel() < 2 or bool((t == t[0]).all())
        stats[u] = None if flat else (float(t.mean()), float(t.std()))
    out = []
    for rs, u in zip(step_rewards, uids):
        if stats[u] is None:
            out.append([0.0] * len(rs))
            continue
        mean, std = stats[u]
        acc, suffix = 0.0, []
        for r in reversed(rs):
            acc += (float(r) - mean) / std
            suffix.append(acc)
        out.append(suffix[::-1])
    return out
