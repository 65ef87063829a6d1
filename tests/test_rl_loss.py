"""GRPO advantages and loss: the pitfalls of rl-distill-anchors.md §6.5 (items 1–5, 7, 10, 12) and parity
with TRL's GRPOTrainer._compute_loss on identical inputs."""

import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dsv32.rl.advantages import group_advantages, process_advantages
from dsv32.rl.loss import (LossConfig, adaptive_entropy_coef, aggregate, grpo_loss, k3, off_policy_mask, token_entropy,
                           unbiased_kl)


# ---------------------------------------------------------------- advantages (§6.5 items 1, 2, 10)

def test_advantages_sum_to_zero_per_group_and_follow_uid_not_position():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.75, 0.0]
    uids = ["a", "b", "a", "b", "a", "b", "a", "b"]      # interleaved: grouping by position would be wrong
    adv, stats = group_advantages(rewards, uids)
    for u in "ab":
        idx = [i for i, x in enumerate(uids) if x == u]
        assert abs(float(adv[idx].sum())) < 1e-6
        mean = sum(rewards[i] for i in idx) / len(idx)
        assert torch.allclose(adv[idx], torch.tensor([rewards[i] - mean for i in idx]), atol=1e-6)
    # Shuffling the rollout batch moves each advantage with its completion.
    perm = list(range(8))
    random.Random(0).shuffle(perm)
    adv2, _ = group_advantages([rewards[i] for i in perm], [uids[i] for i in perm])
    assert torch.allclose(adv2, adv[perm])
    assert stats["num_groups"] == 2


@pytest.mark.parametrize("method", ["group_mean", "group_mean_std", "batch_std", "rloo"])
def test_zero_variance_groups_give_exact_zero_not_nan(method):
    rewards = [0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0]
    uids = [0, 0, 0, 0, 1, 1, 1, 1]
    adv, stats = group_advantages(rewards, uids, method=method)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:4], torch.zeros(4))
    assert (adv[4] > 0) and (adv[5:] < 0).all()
    assert stats["frac_reward_zero_std"] == 0.5


def test_none_rewards_are_excluded_from_baselines():
    adv, stats = group_advantages([1.0, 0.0, None, 0.0], ["g"] * 4)
    mean = 1 / 3
    assert torch.allclose(adv, torch.tensor([1 - mean, -mean, 0.0, -mean]), atol=1e-6)
    assert stats["frac_reward_none"] == 0.25
    # A group where nothing applies (every reward None) gets zero advantage, not NaN.
    adv, stats = group_advantages([None, None, 1.0, 0.0], ["x", "x", "y", "y"])
    assert torch.equal(adv[:2], torch.zeros(2)) and torch.isfinite(adv).all()
    # A single valid reward in a group has no baseline: 0.
    adv, _ = group_advantages([None, 0.7, None], ["z"] * 3, method="rloo")
    assert torch.equal(adv, torch.zeros(3))


def test_std_and_rloo_match_their_formulas_and_trl():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(1)
    r = torch.rand(12, generator=g, dtype=torch.float64)
    uids = [i // 4 for i in range(12)]
    grouped = r.view(3, 4)
    mean = grouped.mean(1, keepdim=True)
    # TRL's scale_rewards="group": (R − mean) / (nanstd + 1e-4)
    expected = ((grouped - mean) / (nanstd(grouped, dim=1)[:, None] + 1e-4)).flatten()
    adv, _ = group_advantages(r, uids, method="group_mean_std")
    assert torch.allclose(adv.double(), expected, atol=1e-6)
    loo = ((grouped.sum(1, keepdim=True) - grouped) / 3)
    adv, _ = group_advantages(r, uids, method="rloo")
    assert torch.allclose(adv.double(), (grouped - loo).flatten(), atol=1e-6)
    expected = ((grouped - mean) / (r.std() + 1e-4)).flatten()
    adv, _ = group_advantages(r, uids, method="batch_std")
    assert torch.allclose(adv.double(), expected, atol=1e-6)


def test_advantage_bad_input_errors():
    with pytest.raises(ValueError, match="uids"):
        group_advantages([1.0, 0.0], ["a"])
    with pytest.raises(ValueError, match="method"):
        group_advantages([1.0], ["a"], method="ppo")
    with pytest.raises(ValueError, match="infinite"):
        group_advantages([math.inf, 0.0], ["a", "a"])


# ---------------------------------------------------------------- OPSM (§6.5 item 3; TRL's three tests)

def test_opsm_keeps_positive_or_low_kl_and_drops_negative_high_kl():  # TRL test_get_off_policy_mask
    mask = torch.ones(3, 4)
    adv = torch.tensor([1.0, -1.0, -1.0])
    sampler = torch.zeros(3, 4)
    logps = torch.zeros(3, 4)
    logps[0], logps[1], logps[2] = -2.0, -0.5, -2.0        # KL 2 (A>0), 0.5 (A<0), 2 (A<0)
    assert torch.equal(off_policy_mask(adv, logps, sampler, mask, 1.0), torch.tensor([1.0, 1.0, 0.0]))


def test_opsm_ignores_padding():  # TRL test_get_off_policy_mask_padding
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([-1.0])
    sampler = torch.zeros(1, 4)
    logps = torch.tensor([[-2.0, -2.0, -1e4, 1e4]])
    assert torch.equal(off_policy_mask(adv, logps, sampler, mask, 1.0), torch.tensor([0.0]))
    logps[0, :2] = -0.5
    assert torch.equal(off_policy_mask(adv, logps, sampler, mask, 1.0), torch.tensor([1.0]))


def test_opsm_never_masks_nonnegative_advantages_and_is_noop_on_policy():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(16, 6, generator=g) * 3
    sampler = logps + 5.0 * torch.rand(16, 6, generator=g)    # the sampler liked these tokens far more
    adv = torch.randn(16, generator=g)
    adv[:4] = 0.0
    keep = off_policy_mask(adv, logps, sampler, torch.ones(16, 6), delta=1e-4)
    assert (keep[adv >= 0] == 1).all() and (keep[adv < 0] == 0).any()
    # On-policy (sampler == policy) the mask is all ones for any δ ≥ 0: the loss is unchanged.
    keep = off_policy_mask(adv, logps, logps.clone(), torch.ones(16, 6), delta=0.0)
    assert torch.equal(keep, torch.ones(16))
    lp = logps.clone().requires_grad_(True)
    cfg_on, cfg_off = LossConfig(opsm_delta=0.0), LossConfig()
    l_on, m_on = grpo_loss(lp, logps, adv, torch.ones(16, 6), cfg_on, sampler_logps_BT=logps)
    l_off, _ = grpo_loss(lp, logps, adv, torch.ones(16, 6), cfg_off)
    assert torch.equal(l_on, l_off) and m_on["opsm/masked_frac"] == 0.0


def test_opsm_masks_whole_sequences_and_leaves_the_kl_term():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    base = torch.tensor([[-1.0, -1.2, -0.8], [-0.5, -0.7, 0.0]])
    sampler = base.clone()
    sampler[1, :2] += 3.0                                    # sequence 1 is far off-policy
    ref = base - 0.3
    adv = torch.tensor([0.5, -0.5])
    lp = base.clone().requires_grad_(True)
    cfg = LossConfig(opsm_delta=0.5, beta=0.1)
    loss, metrics = grpo_loss(lp, base, adv, mask, cfg, sampler_logps_BT=sampler, ref_logps_BT=ref)
    loss.backward()
    assert metrics["opsm/masked_frac"] == 0.5
    # Sequence 1's gradient is only the KL gradient (ratio = 1 here): β·(lp − ref)/|o|/B per token.
    expected_kl_grad = 0.1 * 0.3 / 2 / 2
    assert torch.allclose(lp.grad[1, :2], torch.full((2,), expected_kl_grad), atol=1e-6)
    assert lp.grad[1, 2] == 0                                # padding gets nothing
    # Without OPSM the policy term adds −A/|o|/B = +0.5/4 per token.
    lp.grad = None
    loss, _ = grpo_loss(lp, base, adv, mask, LossConfig(beta=0.1), ref_logps_BT=ref)
    loss.backward()
    assert torch.allclose(lp.grad[1, :2], torch.full((2,), expected_kl_grad + 0.5 / 4), atol=1e-6)


# ---------------------------------------------------------------- KL (§6.5 item 4)

def test_unbiased_kl_gradient_matches_closed_form():
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(4, 5, generator=g) * 2).requires_grad_(True)
    old = lp.detach() + 0.2 * torch.randn(4, 5, generator=g)
    ref = lp.detach() + 0.5 * torch.randn(4, 5, generator=g)
    unbiased_kl(lp, ref, old).sum().backward()
    ratio = (lp.detach() - old).exp()
    assert torch.allclose(lp.grad, ratio * (lp.detach() - ref), atol=1e-6)
    # Plain k3's gradient is 1 − π_ref/π_θ: unbounded as π_θ → 0, which Eq. 7 fixes.
    lp.grad = None
    k3(lp, ref).sum().backward()
    assert torch.allclose(lp.grad, 1 - (ref - lp.detach()).exp(), atol=1e-6)
    # With lp_old == lp the value equals plain k3.
    assert torch.allclose(unbiased_kl(lp.detach(), ref, lp.detach()), k3(lp.detach(), ref))
    assert (k3(lp.detach(), ref) >= 0).all()


def test_beta_per_sequence_and_missing_reference():
    lp = torch.zeros(2, 2, requires_grad=True)
    ref = torch.full((2, 2), -1.0)
    loss, m = grpo_loss(lp, lp.detach(), torch.zeros(2), torch.ones(2, 2), LossConfig(),
                        ref_logps_BT=ref, beta_B=torch.tensor([0.0, 1.0]))
    loss.backward()
    assert lp.grad[0].abs().sum() == 0 and (lp.grad[1] > 0).all() and m["kl"] > 0
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(lp, lp.detach(), torch.zeros(2), torch.ones(2, 2), LossConfig(beta=0.1))


# ---------------------------------------------------------------- ratio 1 / clipping (§6.5 item 5)

def test_process_advantages_follow_the_suffix_sum_formula_per_group():
    steps = [[1, 0, 0.5], [1, 1, 1.5], [0, 2], [0, 1], [1]]
    uids = ["a", "a", "b", "b", "c"]
    out = process_advantages(steps, uids)
    for group in ("a", "b"):
        members = [i for i, u in enumerate(uids) if u == group]
        flat = torch.tensor([float(r) for i in members for r in steps[i]], dtype=torch.float64)
        mean, std = flat.mean(), flat.std()
        for i in members:
            norm = [(r - mean) / std for r in steps[i]]
            expected = [float(sum(norm[j:])) for j in range(len(norm))]
            assert out[i] == pytest.approx(expected, abs=1e-12)
    assert out[4] == [0.0]                                     # a group of one step: no baseline, exactly 0
    assert process_advantages([[1, 1], [1]], [0, 0]) == [[0.0, 0.0], [0.0]]   # all equal: 0, never NaN
    # the wrong middle step of completion 0 is blamed more than the right first step before it
    assert out[0][1] < out[0][0]
    with pytest.raises(ValueError, match="uids"):
        process_advantages([[1]], ["a", "b"])


def test_per_token_advantages_equal_broadcast_ones_and_gate_the_gradient():
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(3, 5, generator=g) * 2).requires_grad_(True)
    old = lp.detach() + 0.05 * torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    adv = torch.tensor([0.5, -1.0, 0.25])
    cfg = LossConfig(opsm_delta=0.01)
    loss_b, m_b = grpo_loss(lp, old, adv, mask, cfg, sampler_logps_BT=old)
    loss_t, m_t = grpo_loss(lp, old, adv[:, None].expand(3, 5), mask, cfg, sampler_logps_BT=old)
    assert torch.allclose(loss_b, loss_t) and m_b["opsm/masked_frac"] == m_t["opsm/masked_frac"]
    token = torch.zeros(3, 5)
    token[0, 2] = 1.0                                          # one token carries all the credit
    lp.grad = None
    grpo_loss(lp, old, token, mask, LossConfig())[0].backward()
    assert lp.grad[0, 2] != 0 and torch.count_nonzero(lp.grad) == 1
    with pytest.raises(ValueError, match="one per token"):
        grpo_loss(lp, old, torch.zeros(3, 4), mask, LossConfig())


def test_first_minibatch_ratio_is_one_and_gradient_is_nonzero():
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 6, generator=g) * 3).requires_grad_(True)
    adv, _ = group_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0])
    loss, m = grpo_loss(lp, lp.detach(), adv, torch.ones(4, 6), LossConfig())
    loss.backward()
    assert m["is/ratio_mean"] == 1.0 and m["is/ratio_max"] == 1.0 and m["clip_ratio/region_mean"] == 0.0
    assert abs(m["policy_loss"]) < 1e-7                     # the "loss = 0" users see is expected ...
    assert lp.grad.norm() > 0                               # ... the gradient is not zero


def test_clip_bounds_and_clip_fractions():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2, 3)
    lp = torch.tensor([[0.5, 0.1, -0.5], [0.5, -0.1, -0.5]]).requires_grad_(True)
    loss, m = grpo_loss(lp, old, adv, torch.ones(2, 3), LossConfig(eps_low=0.2, eps_high=0.28))
    loss.backward()
    # A > 0, ratio e^0.5 > 1.28: clipped, no gradient; A < 0, ratio e^-0.5 < 0.8: clipped, no gradient.
    assert lp.grad[0, 0] == 0 and lp.grad[1, 2] == 0
    assert lp.grad[0, 2] != 0 and lp.grad[1, 0] != 0        # the clip never binds on the other side
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 6) and m["clip_ratio/low_mean"] == pytest.approx(1 / 6)


# ---------------------------------------------------------------- length bias (§6.5 item 7)

def _per_token_grad(aggregation, **kw):
    """A short right answer (2 tokens, A = +1) and a long wrong one (8 tokens, A = −1)."""
    mask = torch.zeros(2, 8)
    mask[0, :2] = 1
    mask[1, :] = 1
    lp = torch.full((2, 8), -1.0, requires_grad=True)
    loss, _ = grpo_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask, LossConfig(aggregation=aggregation, **kw))
    loss.backward()
    return lp.grad[0, 0].abs().item(), lp.grad[1, 0].abs().item()


def test_length_bias_direction_of_each_aggregation():
    short, long = _per_token_grad("seq_mean_token_mean")
    assert long < short and long * 8 == pytest.approx(short * 2)   # 1/|o|: a long wrong answer is under-penalised
    short, long = _per_token_grad("token_mean")
    assert long == pytest.approx(short)                            # DAPO: every token weighs the same
    short, long = _per_token_grad("dr_grpo", max_len=8)
    assert long == pytest.approx(short) and short == pytest.approx(1 / (2 * 8))  # constant normaliser


def test_aggregate_normalizer_makes_microbatches_sum_to_the_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    full = aggregate(x, mask, "token_mean")
    parts = sum(aggregate(x[i:i + 2], mask[i:i + 2], "token_mean", normalizer=mask.sum()) for i in (0, 2, 4))
    assert torch.allclose(full, parts)
    with pytest.raises(ValueError, match="max_len"):
        LossConfig(aggregation="dr_grpo")
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="sum")


# ---------------------------------------------------------------- NaN safety (§6.5 item 12), entropy

def test_padding_with_nonfinite_values_does_not_leak():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, -math.inf]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, math.nan]])
    ref = torch.tensor([[-1.5, -2.5, math.nan]])
    loss, m = grpo_loss(lp, old, torch.tensor([1.0]), mask, LossConfig(beta=0.1, opsm_delta=0.5),
                        sampler_logps_BT=old, ref_logps_BT=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and lp.grad[0, 2] == 0
    assert all(math.isfinite(v) for v in m.values())


def test_token_entropy_over_a_kept_set_and_the_entropy_term():
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    assert torch.allclose(token_entropy(torch.log_softmax(logits, -1)), torch.tensor([[math.log(2)]]))
    z = torch.zeros(1, 1, 4, requires_grad=True)
    ent = token_entropy(torch.log_softmax(z + torch.tensor([2.0, 0, 0, 0]), -1))
    loss, m = grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1),
                        LossConfig(entropy_coef=0.1), entropy_BT=ent)
    loss.backward()
    assert m["entropy"] > 0 and z.grad[0, 0, 0] > 0         # minimising −c·H pushes the peak down
    # over a kept set (banned or truncated ids at -inf) the gradient is finite, and 0 outside the set
    x = torch.zeros(1, 1, 4, requires_grad=True)
    token_entropy(torch.log_softmax(x.masked_fill(torch.tensor([True, True, True, False]).logical_not(),
                                                  -math.inf), -1)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 0, 3] == 0


# ---------------------------------------------------------------- parity with TRL

def _trl_loss(loss_type, logps, old, ref, sampler, adv, mask, beta, eps_low, eps_high, opsm, bias_kl, max_len):
    """Run TRL's own GRPOTrainer._compute_loss with the model forward replaced by the given log-probs."""
    from trl import GRPOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    ident = SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                            gather_for_metrics=lambda t: t, num_processes=1, sync_gradients=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, top_entropy_quantile=1.0,
        off_policy_mask_threshold=opsm, importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=ident,
        max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics,
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, steps_per_generation=1))
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "sampling_per_token_logps": sampler, "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs), metrics["train"]


@pytest.mark.parametrize("loss_type,aggregation", [("grpo", "seq_mean_token_mean"), ("bnpo", "token_mean"),
                                                   ("dapo", "token_mean"), ("dr_grpo", "dr_grpo")])
@pytest.mark.parametrize("beta,bias_kl,opsm", [(0.0, False, None), (0.04, False, None), (0.04, True, 0.05)])
def test_loss_parity_with_trl(loss_type, aggregation, beta, bias_kl, opsm):
    g = torch.Generator().manual_seed(7)
    B, T, max_len = 6, 7, 9
    mask = torch.ones(B, T)
    for i, n in enumerate([7, 3, 5, 1, 6, 4]):
        mask[i, n:] = 0
    base = -torch.rand(B, T, generator=g) * 3
    old = base + 0.3 * torch.randn(B, T, generator=g)       # several minibatches in: ratios leave the clip range
    ref = base + 0.3 * torch.randn(B, T, generator=g)
    sampler = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lp_trl = base.clone().requires_grad_(True)
    lp_ours = base.clone().requires_grad_(True)
    ref_loss, trl_metrics = _trl_loss(loss_type, lp_trl, old, ref, sampler, adv, mask, beta, 0.2, 0.28, opsm,
                                      bias_kl, max_len)
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, beta=beta, unbiased_kl=bias_kl, opsm_delta=opsm,
                     aggregation=aggregation, max_len=max_len)
    loss, metrics = grpo_loss(lp_ours, old, adv, mask, cfg, sampler_logps_BT=sampler, ref_logps_BT=ref)
    ref_loss.backward()
    loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert torch.allclose(lp_ours.grad, lp_trl.grad, atol=1e-6)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert metrics[name] == pytest.approx(trl_metrics[name][0], abs=1e-6), name
    assert metrics["clip_ratio/region_mean"] > 0


def test_adaptive_entropy_raises_the_coefficient_only_below_target():
    assert adaptive_entropy_coef(0.01, entropy=0.1, target=0.2) == pytest.approx(0.015)
    assert adaptive_entropy_coef(0.01, entropy=0.5, target=0.2) == pytest.approx(0.005)
    assert adaptive_entropy_coef(0.0, entropy=0.5, target=0.2) == 0.0                 # never below the floor
    assert adaptive_entropy_coef(0.1, entropy=0.0, target=0.2, hi=0.1) == 0.1         # capped
