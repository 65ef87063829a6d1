"""`make demo` / `dsv32 demo`: the tiny model through the DSA recipe on a CPU, in a couple of minutes.

    dsv32 demo [--steps 120] [--warmup-steps 40] [--sparse-steps 60] [--seq-len 256] [--out runs/demo]

1. builds the `tiny` preset; 2. pre-trains it densely on text that ships with Python (the standard
library's docstrings, byte-level); 3. DSA stage 1: dense attention, only the lightning indexer trains, on
its KL to the dense attention (recall of the attention mass rises from about k/L); 4. DSA stage 2: top-k
attention (64 of 256 keys), LM loss for the model and KL for the indexer; 5. decodes greedily through the
caches; 6. writes a Hugging Face checkpoint and reloads it. The full stages with checkpoints and resume
are `dsv32 pretrain`, `dsv32 dsa-warmup`, `dsv32 dsa-sparse`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import presets
from .data import natural_documents
from .eval import indexer_recall
from .model import Trace, Transformer
from .model.generate import greedy

def stdlib_text() -> bytes:
    """Docstrings of standard-library modules and their public members: real English, always present."""
    return "\n\n".join(natural_documents()).encode("utf-8")


def batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        chunk = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def lm_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def kl_loss(model, x, y):
    """Stage 1: the mean over layers of the indexer KL (the LM head is not needed)."""
    trace = Trace(indexer_kl=[])
    model.hidden(x, trace=trace)
    return torch.stack(trace.indexer_kl).mean()


def lm_and_kl_loss(model, x, y):
    """Stage 2: their gradients are disjoint (the indexer reads detached inputs)."""
    trace = Trace(indexer_kl=[])
    lm = F.cross_entropy(model(x, trace=trace).flatten(0, 1), y.flatten())
    return lm + torch.stack(trace.indexer_kl).mean()


def train(model, data_iter, steps: int, lr: float, loss_fn=lm_loss, params=None, log_every: int = 10) -> list[float]:
    params = list(model.parameters() if params is None else params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, cosine decay to 10%
            warm = min(1.0, (step + 1) / 10)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, y = next(data_iter)
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.3f}", flush=True)
    return losses


@torch.no_grad()
def held_out(model, x, y) -> dict:
    """Mean indexer recall over layers, and the LM loss in each attention mode, on a fixed batch."""
    mode = model.cfg.attn_mode
    recall = sum(r["recall"] for r in indexer_recall(model, x)) / len(model.layers)
    losses = {m: F.cross_entropy(model.set_attn_mode(m)(x).flatten(0, 1), y.flatten()).item() for m in ("dense", "sparse")}
    model.set_attn_mode(mode)
    return {"recall": recall, **losses}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dsv32 demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="dense training steps")
    p.add_argument("--warmup-steps", type=int, default=40, help="DSA stage 1 steps (indexer only)")
    p.add_argument("--sparse-steps", type=int, default=60, help="DSA stage 2 steps (sparse attention)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/demo", help="where the checkpoint goes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()

    cfg = presets.tiny()
    model = Transformer(cfg)
    total, active = presets.count_params(cfg)
    print(f"[1/6] built the tiny preset: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), "
          f"{cfg.n_layers} layers, MLA {cfg.mla.n_heads} heads, {cfg.moe.n_routed_experts} experts (top "
          f"{cfg.moe.n_activated_experts}), indexer {cfg.indexer.n_heads}x{cfg.indexer.head_dim}, top-k {cfg.indexer.topk}")

    text = stdlib_text()
    data = torch.tensor(list(text), dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    val_x, val_y = next(batches(data, 4, args.seq_len, torch.Generator().manual_seed(args.seed + 1)))
    k = cfg.indexer.topk
    print(f"[2/6] dense pre-training: {len(text) / 1e3:.0f} kB of standard-library docstrings, "
          f"batch {args.batch} x {args.seq_len} bytes, {args.steps} steps")
    dense = train(model.set_attn_mode("dense"), batches(data, args.batch, args.seq_len, gen), args.steps, args.lr)
    before = held_out(model, val_x, val_y)

    print(f"[3/6] DSA stage 1 (dense warm-up): only the indexer trains, on KL(dense attention || indexer), "
          f"{args.warmup_steps} steps")
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    warm = train(model, batches(data, args.batch, args.seq_len, gen), args.warmup_steps, 1e-3, kl_loss, indexer)
    after = held_out(model, val_x, val_y)
    print(f"  held-out: indexer recall of the attention mass {before['recall']:.2f} -> {after['recall']:.2f}; "
          f"loss with top-{k} attention {before['sparse']:.3f} -> {after['sparse']:.3f} (dense {after['dense']:.3f})")

    print(f"[4/6] DSA stage 2 (sparse): each query attends to its top-{k} of up to {args.seq_len} keys; "
          f"LM loss for the model, KL for the indexer, {args.sparse_steps} steps")
    model.set_attn_mode("sparse")
    trace = Trace()
    with torch.no_grad():
        model(data[None, : args.seq_len], trace=trace)
    kept = (trace.topk[-1] >= 0).sum(-1).float().mean().item()
    sparse = train(model, batches(data, args.batch, args.seq_len, gen), args.sparse_steps, args.lr / 3, lm_and_kl_loss)
    final = held_out(model, val_x, val_y)
    print(f"  held-out: loss with top-{k} attention {final['sparse']:.3f} (dense {final['dense']:.3f}), "
          f"recall {final['recall']:.2f}")

    model.eval()
    prompt = "Return the "
    ids = torch.tensor([list(prompt.encode())])
    out = greedy(model, ids, 48)
    completion = bytes(int(t) % 256 for t in out[0]).decode("utf-8", errors="replace")
    print(f"[5/6] greedy decoding (sparse, cached): {prompt!r} -> {completion!r}")

    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    reloaded = Transformer.from_pretrained(out_dir).eval()
    with torch.no_grad():
        same = torch.equal(model(data[None, :300]), reloaded(data[None, :300]))
    print(f"[6/6] wrote a Hugging Face checkpoint to {out_dir}/ (config.json + model.safetensors); "
          f"reloaded logits identical: {same}")

    def mean(xs):
        return sum(xs) / len(xs)

    summary = {"params": total, "dense_loss": (dense[0], mean(dense[-10:])), "indexer_kl": (warm[0], warm[-1]),
               "held_out_before_warmup": before, "held_out_after_warmup": after, "held_out_final": final,
               "sparse_loss": (mean(sparse[:10]), mean(sparse[-10:])), "mean_keys_per_query": kept,
               "completion": completion, "reload_identical": same, "seconds": time.time() - t0}
    print(f"done in {summary['seconds']:.0f}s: dense loss {dense[0]:.2f} -> {mean(dense[-10:]):.2f}; indexer KL "
          f"{warm[0]:.2f} -> {warm[-1]:.2f}; recall {before['recall']:.2f} -> {after['recall']:.2f}; held-out loss "
          f"sparse {final['sparse']:.3f} vs dense {final['dense']:.3f} ({kept:.0f} of up to {args.seq_len} keys per query)")
    return summary


if __name__ == "__main__":
    main()
