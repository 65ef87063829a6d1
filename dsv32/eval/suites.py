"""Held-out accuracy of a checkpoint on the verifiable task suites, per domain and thinking mode (greedy).

    dsv32 eval suites --model runs/sft/final                       # every built-in domain, both modes
    dsv32 eval suites --model DIR --tasks mine.jsonl --mode thinking --n 200 --out suites.json

Per domain and mode: accuracy (the final reply verifies with `rl.tasks.verify`, and the reply ended with
EOS), mean response length in tokens (all assistant turns), format compliance (the template parses and
nothing was truncated), for non-thinking mode the share of replies with no reasoning block, and for tool
tasks the share that called a tool. Tool calls run in a loop of up to `max_rounds` turns: the
conversation is re-rendered with the tool outputs and generation continues (rl-distill-anchors.md §1.6).

    result = evaluate_suites(model, heldout_tasks(n=100))
    result["accuracy"]["math"]["thinking"]     # fraction in [0, 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..data.tokenizer import ByteTokenizer

MODES = {"thinking": True, "non_thinking": False}


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy continuations of prompts of different lengths in one batch, stopping at EOS (kept in the
    output). Prompts are left-padded into their own segment (doc_ids 0 vs 1) so no token attends to the
    padding; RoPE is relative, so the shifted positions do not change the result."""
    B, P = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - P)  # the context limit truncates
    if max_new_tokens < 1:
        raise ValueError(f"a {P}-token prompt fills the model's max_seq_len {model.cfg.max_seq_len}; use shorter "
                         "prompts or a model with a longer context")
    device = next(model.parameters()).device
    ids_BP = torch.full((B, P), eos_id, dtype=torch.long)
    docs_BP = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BP[b, P - len(p):] = torch.tensor(p)
        docs_BP[b, P - len(p):] = 1
    cache = model.new_cache(B, P + max_new_tokens)
    logits_BV = model(ids_BP.to(device), cache=cache, doc_ids=docs_BP.to(device))[:, -1]
    ones_B1 = torch.ones(B, 1, dtype=torch.long, device=device)
    out, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt_B = logits_BV.argmax(-1)
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(int(nxt_B[b]))
        done |= nxt_B == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits_BV = model(nxt_B[:, None], cache=cache, doc_ids=ones_B1)[:, -1]
    return out


def heldout_tasks(domains=None, n: int = 100, seed: int = 0, difficulty: int = 1) -> dict[str, list]:
    from ..rl import tasks as T

    return {d: T.make_tasks(d, n, split="heldout", seed=seed, difficulty=difficulty) for d in (domains or T.DOMAINS)}


def run_conversations(model, tasks: list, *, thinking: bool, max_tokens: int = 96, batch_size: int = 64,
                      max_rounds: int = 3, tokenizer=None) -> list[dict]:
    """Greedy replies to each task's prompt, running tool calls; one record per task."""
    from ..data import chat
    from ..rl import tasks as T

    tok = tokenizer or ByteTokenizer()
    convs = [[{"role": "user", "content": t.prompt}] for t in tasks]
    recs = [{"text": "", "length": 0, "tool_calls": 0, "truncated": False, "well_formed": True, "parsed": None}
            for _ in tasks]
    active = list(range(len(tasks)))
    for rnd in range(max_rounds):
        prompts = [tok.encode(chat.render(convs[i], thinking=thinking, tools=T.tools_for(tasks[i]),
                                          add_generation_prompt=True)) for i in active]
        outs = []
        for s in range(0, len(active), batch_size):
            outs += generate(model, prompts[s:s + batch_size], max_tokens, tok.eos_id)
        still = []
        for i, out in zip(active, outs):
            text = tok.decode(out)
            parsed = chat.parse_assistant(text, thinking=thinking)
            r = recs[i]
            r["text"] += text
            r["length"] += len(out)
            r["truncated"] = not out or out[-1] != tok.eos_id
            r["well_formed"] &= bool(parsed.get("well_formed", True)) and not r["truncated"]
            r["parsed"] = parsed
            calls = parsed.get("tool_calls") or []
            if calls and not r["truncated"] and rnd < max_rounds - 1:
                r["tool_calls"] += len(calls)
                convs[i].append({"role": "assistant", "content": parsed.get("content") or "", "tool_calls": calls,
                                 "reasoning_content": parsed.get("reasoning_content")})
                for c in calls:
                    fn = c.get("function", {})
                    convs[i].append({"role": "tool", "tool_call_id": c.get("id", ""),
                                     "content": T.call_tool(fn.get("name", ""), fn.get("arguments", "{}"))})
                still.append(i)
        active = still
        if not active:
            break
    for t, r in zip(tasks, recs):
        content = (r["parsed"] or {}).get("content") or ""
        r["content"] = content
        r["correct"] = (not r["truncated"]) and T.verify(t, content)
        r["reasoning_block"] = "<think>" in r["text"] or "</think>" in r["text"]
        del r["parsed"]
    return recs


def summarize(recs: list[dict], thinking: bool, tool_domain: bool) -> dict:
    n = len(recs)
    out = {"accuracy": sum(r["correct"] for r in recs) / n, "n": n,
           "mean_length": sum(r["length"] for r in recs) / n,
           "format_ok": sum(r["well_formed"] for r in recs) / n,
           "truncated": sum(r["truncated"] for r in recs) / n}
    if not thinking:
        out["no_reasoning_block"] = sum(not r["reasoning_block"] for r in recs) / n
    if tool_domain:
        out["tool_call_rate"] = sum(r["tool_calls"] > 0 for r in recs) / n
    return out


def evaluate_suites(model, tasks_by_domain: dict[str, list], *, modes=tuple(MODES), max_tokens: int = 96,
                    batch_size: int = 64, examples: int = 0) -> dict:
    """{"accuracy": domain -> mode -> fraction, "details": domain -> mode -> metrics, "seconds": ...};
    `examples` > 0 keeps that many (prompt, reply, correct) samples per domain and mode."""
    was_training = model.training
    model.eval()
    t0, acc, details = time.time(), {}, {}
    try:
        for domain, tasks in tasks_by_domain.items():
            for mode in modes:
                thinking = MODES[mode]
                recs = run_conversations(model, tasks, thinking=thinking, max_tokens=max_tokens,
                                         batch_size=batch_size)
                d = summarize(recs, thinking, any(t.meta.get("tools") for t in tasks))
                if examples:
                    d["examples"] = [{"prompt": t.prompt, "reply": r["text"], "correct": r["correct"]}
                                     for t, r in list(zip(tasks, recs))[:examples]]
                acc.setdefault(domain, {})[mode] = d["accuracy"]
                details.setdefault(domain, {})[mode] = d
    finally:
        model.train(was_training)
    return {"accuracy": acc, "details": details, "seconds": time.time() - t0}


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


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
    p.add_argument("--batch-size", type=int, default=64)
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
    result = evaluate_suites(model, by_domain, modes=modes, max_tokens=args.max_tokens, batch_size=args.batch_size,
                             examples=args.examples)
    result.update(model=str(args.model), tasks=args.tasks or "built-in held-out", n=args.n)
    for domain, by_mode in result["details"].items():
        for mode, d in by_mode.items():
            extra = "".join(f" {k} {d[k]:.2f}" for k in ("no_reasoning_block", "tool_call_rate") if k in d)
            print(f"{domain:10} {mode:13} acc {d['accuracy']:.3f}  len {d['mean_length']:5.1f}  "
                  f"format {d['format_ok']:.2f}{extra}", flush=True)
    if args.out:
        _atomic_json(Path(args.out), result)
        print(f"suites: wrote {args.out}", flush=True)
    else:
        print(json.dumps(result["accuracy"], indent=2))
    return 0
