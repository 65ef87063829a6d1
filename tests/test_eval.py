"""Indexer recall and top-k overlap: near k/L for an untrained indexer, higher after stage-1 training,
and equal to 1 when the indexer is given the dense attention's own ranking."""

import torch

from conftest import make_config, scale_weights
from dsv32 import Trace, Transformer
from dsv32.eval import indexer_recall


def test_recall_rises_with_warmup_training():
    torch.manual_seed(0)
    model = scale_weights(Transformer(make_config()), std=0.2)
    ids = torch.randint(0, 97, (2, 64))
    before = indexer_recall(model, ids)
    assert len(before) == 3 and all(0 <= r["recall"] <= 1 and 0 <= r["overlap"] <= 1 for r in before)
    assert all(r["rows"] == 2 * (64 - 8) for r in before)  # rows t >= k see more than k keys
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    opt = torch.optim.AdamW(indexer, lr=3e-3)
    for _ in range(60):
        trace = Trace(indexer_kl=[])
        model.hidden(ids, trace=trace)
        loss = torch.stack(trace.indexer_kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = indexer_recall(model, ids)
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(after, "recall") > mean(before, "recall") + 0.05
    assert mean(after, "overlap") > mean(before, "overlap")
    # No indexer recalls more than the dense attention's own top-k holds (the ceiling), and training
    # the indexer does not move the ceiling (the attention is frozen).
    assert all(r["recall"] <= r["ceiling"] + 1e-5 for r in before + after)
    assert all(abs(a["ceiling"] - b["ceiling"]) < 1e-5 for a, b in zip(before, after))


def test_short_sequences_have_full_recall():
    model = Transformer(make_config())
    out = indexer_recall(model, torch.randint(0, 97, (1, 8)))  # T = k: every key is kept
    assert all(r == {"layer": i, "recall": 1.0, "overlap": 1.0, "ceiling": 1.0, "rows": 0} for i, r in enumerate(out))
