"""The sampling transform against brute force, and the Keep Sampling Mask identity
(rl-distill-anchors.md §1.5, §6.5 item 6): the trainer's log-probs over the replayed kept sets equal the
sampler's bit for bit; without the replay they do not."""

import math

import pytest
import torch

from dsv32.serve.sampling import KeptSets, SamplingParams, logprobs_over_kept, process_logits, sample

V = 50


def logits(n=6, seed=0, scale=3.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def brute_kept(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """The kept set by plain Python loops: top-k, then top-p, then min-p, each on the renormalised dist."""
    x = (row / p.temperature).tolist()
    order = sorted(range(V), key=lambda i: (-x[i], i))
    keep = order[: p.top_k] if p.top_k else order
    z = sum(math.exp(x[i]) for i in keep)
    acc, kept = 0.0, []
    for i in keep:
        if acc >= p.top_p and p.top_p < 1:
            break
        kept.append(i)
        acc += math.exp(x[i]) / z
    z = sum(math.exp(x[i]) for i in kept)
    pmax = max(math.exp(x[i]) / z for i in kept)
    return {i for i in kept if math.exp(x[i]) / z >= p.min_p * pmax}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
])
def test_kept_sets_match_brute_force(params):
    x = logits()
    lp, kept = process_logits(x, params)
    for n in range(x.shape[0]):
        want = brute_kept(x[n], params)
        assert set(kept[n].nonzero().squeeze(1).tolist()) == want
        assert len(want) < V  # the filter really cut something
        # renormalised over the kept set, -inf elsewhere
        ref = torch.log_softmax(x[n, sorted(want)] / params.temperature, -1)
        assert torch.allclose(lp[n, sorted(want)], ref, atol=1e-6)
        assert torch.isinf(lp[n, ~kept[n]]).all()


def test_temperature_only_keeps_everything():
    x = logits()
    lp, kept = process_logits(x, SamplingParams(temperature=0.5))
    assert kept.all()
    assert torch.allclose(lp, torch.log_softmax(x / 0.5, -1), atol=1e-6)


def test_greedy_keeps_the_argmax_with_logprob_zero():
    x = logits()
    lp, kept = process_logits(x, SamplingParams(temperature=0))
    assert (kept.sum(-1) == 1).all() and (kept.float().argmax(-1) == x.argmax(-1)).all()
    tok = sample(lp, [None] * x.shape[0], [True] * x.shape[0])
    assert torch.equal(tok, x.argmax(-1))
    assert lp.gather(1, tok[:, None]).abs().max() == 0


def test_per_row_params():
    x = logits(n=3)
    rows = [SamplingParams(top_k=1), SamplingParams(top_k=7), SamplingParams()]
    _, kept = process_logits(x, rows)
    assert kept.sum(-1).tolist() == [1, 7, V]
    with pytest.raises(ValueError, match="one per row"):
        process_logits(x, rows[:2])


def test_replayed_kept_sets_give_ratio_exactly_one():
    """Keep Sampling Mask: same logits, same kept sets, same temperature -> bit-identical log-probs."""
    x = logits(n=64, seed=3)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=30)
    lp_NV, kept_NV = process_logits(x, params)
    tok = sample(lp_NV, [torch.Generator().manual_seed(i) for i in range(64)])
    sampler_lp = lp_NV.gather(1, tok[:, None]).squeeze(1)
    replay = KeptSets.from_masks(kept_NV).mask()
    x_train = x.clone().requires_grad_(True)
    train_lp = logprobs_over_kept(x_train, tok, replay, 0.7)
    assert torch.equal(train_lp.detach(), sampler_lp)  # ratio exp(0) == 1 exactly
    train_lp.sum().backward()  # differentiable, and no gradient leaks to dropped tokens
    assert x_train.grad.abs().sum() > 0 and x_train.grad[~replay].abs().max() == 0
    no_replay = logprobs_over_kept(x, tok, None, 0.7)
    ratio = (no_replay - sampler_lp).exp()
    assert (ratio < 1 - 1e-3).all()  # the truncated mass biases every ratio below 1


def test_kept_sets_are_compact_and_round_trip():
    x = logits(n=4, seed=5)
    _, few = process_logits(x, SamplingParams(top_k=1))  # 4 bytes of ids < 7 bytes of bits
    _, many = process_logits(x, SamplingParams(top_p=0.999))
    for mask in (few, many):
        ks = KeptSets.from_masks(mask)
        assert len(ks) == 4 and torch.equal(ks.mask(), mask)
    assert all(r.dtype == torch.int32 and r.numel() == 1 for r in KeptSets.from_masks(few).rows)
    assert all(r.dtype == torch.uint8 for r in KeptSets.from_masks(many).rows)  # bits beat ids here
    assert KeptSets.from_masks(many).nbytes <= 4 * (V + 7) // 8


def test_seeded_draws_are_reproducible_and_independent_of_the_batch():
    x = logits(n=5, seed=7, scale=1.0)
    lp, _ = process_logits(x, SamplingParams())
    draws = lambda rows: sample(lp[rows], [torch.Generator().manual_seed(11) for _ in rows])  # noqa: E731
    a = torch.stack([draws([0, 1, 2, 3, 4]) for _ in range(20)], 1)
    b = torch.stack([draws([3]) for _ in range(20)], 1)
    assert torch.equal(a[3], b[0])
    seq = lambda seed: [sample(lp[:1], [g])[0].item() for g in [torch.Generator().manual_seed(seed)] for _ in range(30)]  # noqa: E731
    assert seq(1) == seq(1) and seq(1) != seq(2)


def test_sampling_follows_the_processed_distribution():
    x = logits(n=1, seed=9, scale=1.0)
    params = SamplingParams(temperature=0.8, top_k=4)
    lp, kept = process_logits(x, params)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([sample(lp, [g])[0] for _ in range(4000)]), minlength=V).float()
    assert counts[~kept[0]].sum() == 0
    assert (counts / 4000 - lp[0].exp()).abs().max() < 0.03


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                         ("min_p", 2.0), ("max_tokens", 0), ("stop", ("",))])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_banned_ids_get_no_mass_are_outside_the_kept_set_and_replay_exactly():
    """Banned ids come out before the filters: never kept, never the greedy pick, and the trainer's replay over
    the kept sets (which exclude them) gives the sampler's log-probs exactly."""
    x = logits()
    top = x.argmax(-1)
    for p in (SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, top_k=3, top_p=0.9),
              SamplingParams(temperature=0.0)):
        banned = p.banning(top.tolist())
        assert banned.truncates and banned.banned_token_ids == tuple(sorted(set(top.tolist())))
        lp, kept = process_logits(x, banned)
        assert not kept[:, list(banned.banned_token_ids)].any() and torch.isinf(lp[kept.logical_not()]).all()
        assert (kept.sum(-1) >= 1).all() and (lp.exp().sum(-1) - 1).abs().max() < 1e-5
        tok = sample(lp, [None] * len(x), [p.temperature == 0] * len(x))
        assert not any(t in banned.banned_token_ids for t in tok.tolist())
        if p.temperature == 0:   # the argmax of what is left
            ban = torch.zeros_like(kept)
            ban[:, list(banned.banned_token_ids)] = True
            assert torch.equal(tok, x.masked_fill(ban, float("-inf")).argmax(-1))
        replay = logprobs_over_kept(x, tok, kept, p.temperature)
        assert torch.equal(replay, lp.gather(1, tok[:, None]).squeeze(1))
    with pytest.raises(ValueError, match="banned_token_ids"):
        SamplingParams(banned_token_ids=(-1,))
    assert SamplingParams(logprobs=True).banning([3]).return_kept   # RL needs the kept sets to replay the ban
