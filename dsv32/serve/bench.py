"""`dsv32 bench serve`: decode throughput of the serving engine.

    dsv32 bench serve --preset tiny --out runs/bench          # random weights: speed does not need training
    dsv32 bench serve --model runs/demo/final --batches 1,8,32 --contexts 64,1024 --steps 16

For each attention mode (dense, sparse), context (a short one and a long one, longer than the model's
indexer top-k so that sparse attention really selects) and batch size, the engine gets `batch` prompts of
`context` tokens, prefills them, then runs `steps` timed decode steps (after `warmup` untimed ones).
Decode tokens/s = batch * steps / seconds: the whole engine step (model, sampling at temperature 1 with
top-p 0.95, bookkeeping) as a server runs it. Prefill time is reported beside it. Writes `serve.json` and
`serve.md` into --out.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from ..io import atomic_write, write_json
from .engine import Engine
from .sampling import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, *, mode: str, context: int, batch: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """One cell: prefill `batch` prompts of `context` tokens, then time `steps` decode steps."""
    model.set_attn_mode(mode)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, context), generator=g).tolist()
    engine = Engine(model, max_batch=batch, max_len=context + warmup + steps + 2, max_prefill_tokens=batch * context)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=warmup + steps + 1, seed=seed)
    for p in prompts:
        engine.add_request(p, params)
    _sync(device)
    t0 = time.perf_counter()
    engine.step()  # admits and prefills every prompt, samples their first tokens
    _sync(device)
    prefill_s = time.perf_counter() - t0
    assert len(engine.running) == batch, "every request must be running before the decode steps are timed"
    for _ in range(warmup):
        engine.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"mode": mode, "context": context, "batch": batch, "steps": steps, "decode_s": dt,
            "step_ms": 1e3 * dt / steps, "decode_tok_s": batch * steps / dt, "prefill_s": prefill_s,
            "prefill_tok_s": batch * context / prefill_s}


def markdown(records: list[dict], meta: dict) -> str:
    batches = sorted({r["batch"] for r in records})
    lines = [f"# dsv32 bench serve: {meta['model']}", "",
             f"{meta['params_m']:.2f}M parameters, indexer top-k {meta['topk']}, {meta['device']} "
             f"({meta['threads']} threads), torch {meta['torch']}, {meta['dtype']}. Decode tokens/s = batch x "
             f"steps / time of {meta['steps']} engine steps (model + sampling), after {meta['warmup']} warm-up "
             "steps; sparse/dense is the ratio at the same context and batch.", "",
             "| mode | context | " + " | ".join(f"batch {b} tok/s" for b in batches) + " | "
             + " | ".join(f"prefill b{b} s" for b in batches) + " |",
             "|---|---:|" + "---:|" * (2 * len(batches))]
    cell = {(r["mode"], r["context"], r["batch"]): r for r in records}
    for mode in ("dense", "sparse"):
        for ctx in sorted({r["context"] for r in records}):
            rs = [cell.get((mode, ctx, b)) for b in batches]
            lines.append(f"| {mode} | {ctx} | " + " | ".join(f"{r['decode_tok_s']:.1f}" if r else "-" for r in rs)
                         + " | " + " | ".join(f"{r['prefill_s']:.3f}" if r else "-" for r in rs) + " |")
    lines += ["", "| context | " + " | ".join(f"sparse/dense b{b}" for b in batches) + " |",
              "|---:|" + "---:|" * len(batches)]
    for ctx in sorted({r["context"] for r in records}):
        ratios = []
        for b in batches:
            d, s = cell.get(("dense", ctx, b)), cell.get(("sparse", ctx, b))
            ratios.append(f"{s['decode_tok_s'] / d['decode_tok_s']:.2f}x" if d and s else "-")
        lines.append(f"| {ctx} | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. {flag} 1,8,32; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs positive integers; got {text!r}")
    return values


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 bench serve", description="decode throughput of the serving engine")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face checkpoint directory")
    src.add_argument("--preset", default="tiny", help="random weights of a preset (default tiny)")
    p.add_argument("--out", default="runs/bench", help="folder for serve.json and serve.md")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", help="short,long (default: 32 and 4 x the indexer top-k)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .. import presets
    from ..model import Transformer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.model:
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        name = args.model
    else:
        model = Transformer(presets.get(args.preset)).to(device=device, dtype=dtype)
        name = f"preset {args.preset} (random weights)"
    model.eval()
    topk = model.cfg.indexer.topk
    contexts = _ints(args.contexts, "--contexts") if args.contexts else [32, 4 * topk]
    batches = _ints(args.batches, "--batches")
    if max(contexts) + args.warmup + args.steps + 2 > model.cfg.max_seq_len:
        raise ValueError(f"context {max(contexts)} + steps exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    meta = {"model": name, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "params_m": model.num_params() / 1e6, "topk": topk,
            "steps": args.steps, "warmup": args.warmup, "platform": platform.platform()}
    records = []
    with torch.no_grad():
        for mode in ("dense", "sparse"):  # first calls pay one-time costs (allocator, kernel choice): not timed
            measure(model, mode=mode, context=max(contexts), batch=1, steps=1, warmup=0)
        for mode in ("dense", "sparse"):
            for ctx in contexts:
                for b in batches:
                    r = measure(model, mode=mode, context=ctx, batch=b, steps=args.steps, warmup=args.warmup)
                    records.append(r)
                    print(f"{mode:6} context {ctx:6} batch {b:3}: {r['decode_tok_s']:9.1f} tok/s decode "
                          f"({r['step_ms']:.1f} ms/step), prefill {r['prefill_s']:.3f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serve.json", {"meta": meta, "results": records})
    atomic_write(out / "serve.md", markdown(records, meta))
    print(f"wrote {out / 'serve.json'} and {out / 'serve.md'}")
    return 0
