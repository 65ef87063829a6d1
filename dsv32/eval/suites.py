"""Held-out accuracy of a checkpoint on the verifiable task suites, per domain and thinking mode (greedy).

    dsv32 eval suites --model runs/sft/final                       # every built-in domain, both modes
    dsv32 eval suites --model DIR --tasks mine.jsonl --mode thinking --n 200 --out suites.json

Greedy decoding (temperature 0) through the serving engine, with the RL rollout's tool loop (calls run,
outputs appended, generation continues, up to `max_turns` model turns; rl-distill-anchors.md §1.6).
Per domain and mode: accuracy (the final reply verifies with `rl.tasks.verify` and ended with EOS), mean
response length in tokens (all model turns), format compliance (the template parses, nothing truncated),
for non-thinking mode the share of replies with no reasoning block anywhere (the sampler bans the markers in
that mode) and the same share before the ban (`no_reasoning_block_unbanned`), and for tool tasks the share
that called a tool.

    result = evaluate_suites(model, heldout_tasks(n=100))
    result["accuracy"]["math"]["thinking"]     # fraction in [0, 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..data.tokenizer import ByteTokenizer
from ..io import write_json

MODES = {"thinking": True, "non_thinking": False}


def heldout_tasks(domains=None, n: int = 100, seed: int = 0, difficulty: int = 1) -> dict[str, list]:
    from ..rl import tasks as T

    """`n` held-out tasks per domain (fewer where a domain's held-out split is smaller; `n` in the result says)."""
    return {d: T.make_tasks(d, n, split="heldout", seed=seed, difficulty=difficulty, allow_fewer=True)
            for d in (domains or T.DOMAINS)}


def correct(sample) -> bool:
    """The reply ended (not truncated) and its final answer verifies (`tasks.verify`); the RL trainer's rule."""
    from ..data.chat import parse_assistant
    from ..rl.tasks import verify

    content = (parse_assistant(sample.text, thinking=sample.thinking)["content"] or "").strip()
    return (not sample.truncated) and bool(content) and verify(sample.task, content)


def score(samples: list, tokenizer=None) -> dict:
    """Suite metrics of rollouts (`dsv32.rl.rollout.Sample`, one per task, all in one mode)."""
    from ..data.chat import parse_assistant

    tok = tokenizer or ByteTokenizer()
    n, thinking = len(samples), samples[0].thinking
    out = {"accuracy": sum(map(correct, samples)) / n, "n": n,
           "mean_length": sum(s.n_generated for s in samples) / n,
           "format_ok": sum(parse_assistant(s.text, thinking=thinking)["well_formed"] and not s.truncated
                            for s in samples) / n,
           "truncated": sum(s.truncated for s in samples) / n}
    if not thinking:  # everything the model wrote, every turn: no <think> or </think> anywhere
        generated = [tok.decode([t for t, m in zip(s.ids, s.gen_mask) if m]) for s in samples]
        clean = ["<think>" not in g and "</think>" not in g for g in generated]
        out["no_reasoning_block"] = sum(clean) / n
        # The sampler bans the markers in this mode; without the ban, a greedy reply is the same up to the first
        # token where the model's own top choice was a marker, so this is the model's rate before the ban.
        out["no_reasoning_block_unbanned"] = sum(c and not s.banned_argmax for c, s in zip(clean, samples)) / n
    if any(s.task.meta.get("tools") for s in samples):
        out["tool_call_rate"] = sum(any(m["role"] == "tool" for m in s.transcript) for s in samples) / n
    return out


@torch.no_grad()
def evaluate_suites(model, tasks_by_domain: dict[str, list], *, modes=tuple(MODES), max_tokens: int = 96,
                    max_batch: int = 64, max_turns: int = 3, examples: int = 0) -> dict:
    """{"accuracy": domain -> mode -> fraction, "details": domain -> mode -> metrics, "seconds": ...}, greedy
    through the serving engine (temperature 0) and the RL rollout's tool loop; `examples` > 0 keeps that many
    (prompt, last reply, correct) samples per domain and mode."""
    from ..rl.rollout import rollout
    from ..serve.engine import Engine
    from ..serve.sampling import SamplingParams

    tok = ByteTokenizer()
    engine = Engine(model, max_batch=max_batch, eos_id=tok.eos_id, decode=tok.decode, vocab_limit=tok.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    was_training = model.training
    model.eval()
    t0, acc, details = time.time(), {}, {}
    try:
        for domain, tasks in tasks_by_domain.items():
            for mode in modes:
                samples = rollout(engine, tok, tasks, group_size=1, params=greedy, thinking=MODES[mode],
                                  max_turns=max_turns)
                d = score(samples, tok)
                if examples:
                    d["examples"] = [{"prompt": s.task.prompt, "reply": s.text, "correct": correct(s)}
                                     for s in samples[:examples]]
                acc.setdefault(domain, {})[mode] = d["accuracy"]
                details.setdefault(domain, {})[mode] = d
    finally:
        model.train(was_training)
    return {"accuracy": acc, "details": details, "seconds": time.time() - t0}


def main(argv: list[str]) -> int:
    """`dsv32 eval suites`: prints a table and writes JSON (stdout when no --out)."""
    from ..rl import tasks as T
    from ..train.stages import build_model

    p = argparse.ArgumentParser(prog="dsv32 eval suites", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="a save_pretrained directory or a run directory")
    p.add_argument("--tasks", default=None, metavar="FILE.jsonl", help='user tasks {"prompt","answer","domain"}')
    p.add_argument("--domains", default=",".join(T.DOMAINS), help="built-in domains (ignored with --tasks)")
    p.add_argument("--n", type=int, default=100, help="held-out tasks per domain (user file: the first N)")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="both", choices=("both", "thinking", "non-thinking", "non_thinking"))
    p.add_argument("--max-tokens", type=int, default=96, help="new tokens per assistant turn")
    p.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    p.add_argument("--examples", type=int, default=0, help="keep this many sample replies per domain and mode")
    p.add_argument("--out", default=None, metavar="FILE.json")
    args = p.parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model = build_model(init_from=args.model)
    if args.tasks:
        by_domain: dict[str, list] = {}
        for t in T.load_tasks_jsonl(args.tasks):
            by_domain.setdefault(t.domain, []).append(t)
        by_domain = {d: ts[:args.n] for d, ts in by_domain.items()}
    else:
        names = [d.strip() for d in args.domains.split(",") if d.strip()]
        bad = [d for d in names if d not in T.DOMAINS]
        if bad:
            raise ValueError(f"--domains: unknown {bad}; choose from {', '.join(T.DOMAINS)}")
        by_domain = heldout_tasks(names, args.n, args.seed, args.difficulty)
    modes = tuple(MODES) if args.mode == "both" else ("thinking",) if args.mode == "thinking" else ("non_thinking",)
    result = evaluate_suites(model, by_domain, modes=modes, max_tokens=args.max_tokens, max_batch=args.max_batch,
                             examples=args.examples)
    result.update(model=str(args.model), tasks=args.tasks or "built-in held-out", n=args.n)
    for domain, by_mode in result["details"].items():
        for mode, d in by_mode.items():
            extra = "".join(f" {k} {d[k]:.2f}" for k in ("no_reasoning_block", "tool_call_rate") if k in d)
            print(f"{domain:10} {mode:13} acc {d['accuracy']:.3f}  len {d['mean_length']:5.1f}  "
                  f"format {d['format_ok']:.2f}{extra}", flush=True)
    if args.out:
        write_json(args.out, result)
        print(f"suites: wrote {args.out}", flush=True)
    else:
        print(json.dumps(result["accuracy"], indent=2))
    return 0
