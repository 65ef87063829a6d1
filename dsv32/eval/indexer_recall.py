"""How well the lightning indexer picks what dense attention would attend to, per layer
(dsa-anchors.md §7.1 item 8, §7.4 item 16):

- recall:  the share of the head-averaged dense attention mass that falls inside the indexer's top-k
           set S_t (1.0 = sparse attention loses nothing); an untrained indexer gives about k/L.
- overlap: |S_t ∩ top-k of the dense attention| / k.
- ceiling: the attention mass inside the dense attention's own top-k: the best recall any indexer could
           reach at this k (a diffuse head caps it well below 1).
Both are averaged over the queries that see more than k keys (the others keep every key).

O(T*S) memory per layer (dense probabilities): an evaluation tool for moderate lengths.
"""

from __future__ import annotations

import torch

from ..kernels import reference as ref


@torch.no_grad()
def indexer_recall(model, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[dict]:
    """Per layer: {"layer", "recall", "overlap", "ceiling", "rows"} for one batch of token ids [B, T]."""
    inputs = []
    hooks = [layer.attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for layer in model.layers]
    try:
        model.hidden(input_ids, doc_ids=doc_ids)
    finally:
        for h in hooks:
            h.remove()
    B, T = input_ids.shape
    ctx = model.context(B, T, 0, doc_ids, None, input_ids.device)
    out = []
    for i, (layer, x_BTd) in enumerate(zip(model.layers, inputs)):
        attn = layer.attn
        k = attn.topk
        qr, q_nope, q_pe, kv, pe = attn.project(x_BTd, ctx)
        # head-averaged dense attention over the visible keys
        visible_BTS = ref.valid_mask(ctx.ks, ctx.ke, T)
        s_BTHS = (torch.einsum("bthr,bsr->bths", attn._absorb_q(q_nope).float(), kv.float())
                  + torch.einsum("bthp,bsp->bths", q_pe.float(), pe.float())) * attn.softmax_scale
        p_BTS = torch.softmax(s_BTHS.masked_fill(~visible_BTS[:, :, None], float("-inf")), dim=-1).mean(2)
        # the indexer's choice, and the dense attention's own top-k
        ik, ik_scale = attn.indexer.keys(x_BTd, ctx.cos, ctx.sin)
        iq, iw = attn.indexer.queries(x_BTd, qr, ctx.cos, ctx.sin)
        idx_BTK = ref.select_topk(ref.indexer_scores(iq, iw, ik, ik_scale), ctx.ks, ctx.ke, k)
        best_BTK = ref.select_topk(p_BTS, ctx.ks, ctx.ke, k)
        chosen_BTS = ref.selected_mask(idx_BTK, T)
        rows_BT = (ctx.ke - ctx.ks) > k
        n = int(rows_BT.sum())
        if n == 0:
            out.append({"layer": i, "recall": 1.0, "overlap": 1.0, "ceiling": 1.0, "rows": 0})
            continue
        recall_BT = (p_BTS * chosen_BTS).sum(-1)
        best_BTS = ref.selected_mask(best_BTK, T)
        overlap_BT = (chosen_BTS & best_BTS).sum(-1).float() / k
        ceiling_BT = (p_BTS * best_BTS).sum(-1)
        out.append({"layer": i, "recall": recall_BT[rows_BT].mean().item(),
                    "overlap": overlap_BT[rows_BT].mean().item(), "ceiling": ceiling_BT[rows_BT].mean().item(),
                    "rows": n})
    return out
