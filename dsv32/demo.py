"""`make demo` / `dsv32 demo`: the tiny model end to end on a CPU, in about a minute.

    dsv32 demo [--steps 120] [--sparse-steps 60] [--seq-len 256] [--out runs/demo]

1. builds the `tiny` preset; 2. trains it densely on text that ships with Python (the standard
library's docstrings, byte-level); 3. switches to sparse attention (top-k 64 of 256 keys) and trains on;
4. decodes greedily through the caches; 5. writes a Hugging Face checkpoint and reloads it.
The indexer is untrained here (its warm-up and the sparse stage are `dsv32 dsa-warmup` / `dsa-sparse`),
so this shows that every path runs and learns, not that sparse matches dense.
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


def train(model, data_iter, steps: int, lr: float, log_every: int = 10) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, cosine decay to 10%
            warm = min(1.0, (step + 1) / 10)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, y = next(data_iter)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.3f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dsv32 demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="dense training steps")
    p.add_argument("--sparse-steps", type=int, default=60, help="sparse training steps after the dense ones")
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
    print(f"[1/5] built the tiny preset: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), "
          f"{cfg.n_layers} layers, MLA {cfg.mla.n_heads} heads, {cfg.moe.n_routed_experts} experts (top "
          f"{cfg.moe.n_activated_experts}), indexer {cfg.indexer.n_heads}x{cfg.indexer.head_dim}, top-k {cfg.indexer.topk}")

    text = stdlib_text()
    data = torch.tensor(list(text), dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"[2/5] dense training: {len(text) / 1e3:.0f} kB of standard-library docstrings, "
          f"batch {args.batch} x {args.seq_len} bytes, {args.steps} steps")
    dense = train(model.set_attn_mode("dense"), batches(data, args.batch, args.seq_len, gen), args.steps, args.lr)

    print(f"[3/5] sparse training: each query attends to its top-{cfg.indexer.topk} of up to {args.seq_len} keys, "
          f"{args.sparse_steps} steps")
    model.set_attn_mode("sparse")
    trace = Trace()
    with torch.no_grad():
        model(data[None, : args.seq_len], trace=trace)
    kept = (trace.topk[-1] >= 0).sum(-1).float().mean().item()
    sparse = train(model, batches(data, args.batch, args.seq_len, gen), args.sparse_steps, args.lr / 3)

    model.eval()
    prompt = "Return the "
    ids = torch.tensor([list(prompt.encode())])
    out = greedy(model, ids, 48)
    completion = bytes(int(t) % 256 for t in out[0]).decode("utf-8", errors="replace")
    print(f"[4/5] greedy decoding (sparse, cached): {prompt!r} -> {completion!r}")

    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    reloaded = Transformer.from_pretrained(out_dir).eval()
    with torch.no_grad():
        same = torch.equal(model(data[None, :300]), reloaded(data[None, :300]))
    print(f"[5/5] wrote a Hugging Face checkpoint to {out_dir}/ (config.json + model.safetensors); "
          f"reloaded logits identical: {same}")

    def mean(xs):
        return sum(xs) / len(xs)

    summary = {"params": total, "dense_loss": (dense[0], mean(dense[-10:])),
               "sparse_loss": (mean(sparse[:10]), mean(sparse[-10:])), "mean_keys_per_query": kept,
               "completion": completion, "reload_identical": same, "seconds": time.time() - t0}
    print(f"done in {summary['seconds']:.0f}s: dense loss {dense[0]:.2f} -> {mean(dense[-10:]):.2f}, then sparse "
          f"{mean(sparse[:10]):.2f} -> {mean(sparse[-10:]):.2f} (means of 10 steps; {kept:.0f} keys per query "
          f"on average, of up to {args.seq_len})")
    return summary


if __name__ == "__main__":
    main()
