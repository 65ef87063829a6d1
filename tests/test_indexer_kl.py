"""The indexer's training loss through the model (dsa-anchors.md §1.9, §7.4 items 10-11): the KL reaches
only the indexer, the LM loss only the main model, in both stages."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config, scale_weights
from dsv32 import Trace, Transformer


def _model(mode):
    return scale_weights(Transformer(make_config(attn_mode=mode)), std=0.2)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _is_zero(g):
    return g is None or bool((g == 0).all())


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_gradients_are_isolated(mode):
    model = _model(mode)
    ids = torch.randint(0, 97, (2, 40))  # 40 > topk 8: sparse mode selects
    trace = Trace(indexer_kl=[])
    logits = model(ids, trace=trace)
    assert len(trace.indexer_kl) == 3 and all(kl.ndim == 0 and kl.item() > 0 for kl in trace.indexer_kl)
    assert (trace.topk[0] is None) == (mode == "dense")
    kl = torch.stack(trace.indexer_kl).mean()
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    g_kl, g_lm = _grads(model, kl), _grads(model, lm)
    indexer = [n for n in g_kl if ".indexer." in n]
    main = [n for n in g_kl if ".indexer." not in n]
    assert all(_is_zero(g_kl[n]) for n in main)  # the KL never reaches the main model
    assert all(_is_zero(g_lm[n]) for n in indexer)  # the LM loss never reaches the indexer
    assert all(not _is_zero(g_kl[n]) for n in indexer)  # and it does reach every indexer weight
    assert sum(not _is_zero(g_lm[n]) for n in main) > len(main) // 2


def test_stage1_step_changes_only_the_indexer():
    model = _model("dense")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    opt = torch.optim.AdamW(indexer, lr=1e-3)
    ids = torch.randint(0, 97, (2, 40))
    losses = []
    for _ in range(15):
        trace = Trace(indexer_kl=[])
        model.hidden(ids, trace=trace)  # the LM head is not needed: the main model is frozen
        loss = torch.stack(trace.indexer_kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (".indexer." not in n), n
    assert losses[-1] < losses[0]  # the indexer learns to match the dense attention


def test_kl_needs_no_cache():
    model = _model("sparse")
    with pytest.raises(ValueError, match="without a cache"):
        model(torch.randint(0, 97, (1, 12)), cache=model.new_cache(1, 16), trace=Trace(indexer_kl=[]))
