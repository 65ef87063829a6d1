"""Greedy decoding over the latent-KV and index-key caches (prefill once, then one token per step).

The full sampler (temperature, top-p, batching, log-probs) is the serving engine's job; this is the
minimal loop the demo and tests use to show cached decoding works.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, prompt_BT: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Returns the generated tokens [B, <= max_new_tokens] (stops early once every row has hit EOS)."""
    B, T = prompt_BT.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(prompt_BT, cache=cache)[:, -1]
    out, done = [], torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        out.append(nxt)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return torch.stack(out, dim=1)
