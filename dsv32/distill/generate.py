"""Dual-mode data generation (`dsv32 distill generate`, rl-distill-anchors.md §6.1 item 9, §4.4).

    dsv32 distill generate --model runs/p/specialist-math/final --domain math --out data/math.jsonl
    dsv32 distill generate --model DIR --domain tool --prompts 300 --samples 4 --modes thinking --out tool.jsonl

A specialist answers its domain's TRAINING prompts (never the held-out split) in thinking and in
non-thinking mode, `samples` candidates per prompt through the serving engine and the RL rollout's tool
loop. A candidate is kept only if it verifies (finished, well formed, its final answer checks with
`rl.tasks.verify`; thinking: the reasoning is right step by step, `rl.tasks.reasoning_ok`, unless
`check_reasoning=False`; non-thinking: no reasoning block anywhere); of the verified ones the best by the domain's
rubric (ties: the shortest) becomes the record (rejection sampling, best of N). Records are deduplicated on
(mode, prompt) and on (mode, reply). One JSON object per line:

    {"messages": [...], "reasoning_content": str | None, "mode": "thinking" | "non_thinking", "domain": "math",
     "source_model": "specialist-math", "verifier_scores": {"total": 1.5, "correctness": 1.0, ...},
     "tools": [...] | absent}

which `dsv32 sft --data` and `dsv32 distill train` read. With `negatives` (`--negatives N`), up to N failed
non-thinking replies follow as `"negative": true` records: the distillation trains no cross-entropy on them, only
the block penalty (`negative_records`). Statistics per domain and mode (prompts, candidates,
verified rate, prompt yield, duplicates, records, mean length) go beside the file as `<name>.stats.json`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.chat import parse_assistant
from ..data.tokenizer import ByteTokenizer
from ..io import write_json, write_jsonl

MODES = {"thinking": True, "non_thinking": False}


@dataclass
class GenerateConfig:
    prompts: int = 256            # training prompts per domain (each answered in every mode)
    samples: int = 4              # candidates per prompt (best of N)
    thinking_samples: int = 0     # candidates per prompt in thinking mode (0: `samples`); checked traces fail more
    temperature: float = 0.8
    max_tokens: int = 96          # per model turn
    max_turns: int = 3            # model turns in the tool loop
    difficulty: int = 1
    modes: tuple = ("thinking", "non_thinking")
    max_batch: int = 64           # requests decoded together
    seed: int = 0
    # A training prompt with a verified thinking record but no verified direct answer also gets a non-thinking
    # record: the same transcript without its reasoning (the verified final answer as the direct response), so
    # the two modes are balanced prompt for prompt (see `direct_records`).
    fill_non_thinking: bool = False
    # A thinking candidate also needs a reasoning that is right step by step (`rl.tasks.reasoning_ok`), not only a
    # right final answer: measured on the tiny specialists, 117 of 153 verified logic traces had a wrong order
    # (`Bob>Bob>Hal`) and 18 of 601 math traces a wrong step (`6-4=0\n0-2=0`) before a lucky answer.
    check_reasoning: bool = True
    # Up to this many failed non-thinking replies (one per prompt) kept as negative records (`negative_records`):
    # the distillation trains no cross-entropy on them, only the unlikelihood of a reasoning block
    # (`sft.make_loss`), so the generalist also learns the non-thinking format off the verified path.
    negatives: int = 0

    def __post_init__(self):
        self.modes = tuple(m.replace("-", "_") for m in self.modes)
        checks = [("prompts", self.prompts >= 1, "must be >= 1"), ("samples", self.samples >= 1, "must be >= 1"),
                  ("thinking_samples", self.thinking_samples >= 0, "must be >= 0 (0: samples)"),
                  ("negatives", self.negatives >= 0, "must be >= 0 (0: none)"),
                  ("temperature", self.temperature > 0, "must be > 0 (best of N needs distinct candidates)"),
                  ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
                  ("modes", bool(self.modes) and set(self.modes) <= set(MODES),
                   "must name thinking and/or non_thinking")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"GenerateConfig.{name}={getattr(self, name)!r} {why}")


@dataclass
class Stats:
    prompts: int = 0
    candidates: int = 0
    verified: int = 0             # candidates that verified
    wrong_reasoning: int = 0      # candidates with a right answer after a wrong step (thinking, check_reasoning)
    prompts_verified: int = 0     # prompts with at least one verified candidate
    duplicates: int = 0           # verified winners dropped as duplicates
    records: int = 0
    tokens: int = 0               # generated tokens of the kept records
    reward: float = 0.0           # summed rubric total of the kept records

    def summary(self) -> dict:
        n = max(self.records, 1)
        return {"prompts": self.prompts, "candidates": self.candidates, "verified": self.verified,
                "wrong_reasoning": self.wrong_reasoning,
                "verified_rate": self.verified / max(self.candidates, 1),
                "prompt_yield": self.prompts_verified / max(self.prompts, 1), "duplicates": self.duplicates,
                "records": self.records, "mean_length": self.tokens / n, "mean_reward": self.reward / n}


def reasoning_right(sample) -> bool:
    """A thinking reply's reasoning is right step by step (`rl.tasks.reasoning_ok`), not only its final answer."""
    from ..rl.tasks import reasoning_ok

    return reasoning_ok(sample.task, parse_assistant(sample.text, thinking=True)["reasoning_content"])


def verified(sample, tokenizer, check_reasoning: bool = False) -> bool:
    """Finished, well formed, the final answer verifies; a thinking reply's reasoning is right step by step
    (`check_reasoning`); a non-thinking reply has no reasoning block anywhere."""
    from ..eval.suites import correct

    parsed = parse_assistant(sample.text, thinking=sample.thinking)
    if not correct(sample) or not parsed["well_formed"]:
        return False
    if sample.thinking:
        return not check_reasoning or reasoning_right(sample)
    generated = tokenizer.decode([t for t, m in zip(sample.ids, sample.gen_mask) if m])
    return "<think>" not in generated and "</think>" not in generated


def record_of(sample, domain: str, source_model: str, scores: dict) -> dict:
    """A verified sample as a distillation record (the transcript the template renders back exactly)."""
    from ..rl import tasks as T

    messages = []
    for m in sample.transcript:
        m = {k: v for k, v in m.items() if v not in (None, [])}
        if m["role"] == "assistant":
            m.setdefault("content", "")
            if not sample.thinking:
                m.pop("reasoning_content", None)
        messages.append(m)
    last = [m for m in messages if m["role"] == "assistant"][-1]
    rec = {"messages": messages, "reasoning_content": last.get("reasoning_content"),
           "mode": "thinking" if sample.thinking else "non_thinking", "domain": domain,
           "source_model": source_model, "verifier_scores": scores}
    tools = T.tools_for(sample.task)
    if tools:
        rec["tools"] = tools
    return rec


def best_of_n(samples: list, group_size: int, domain: str, source_model: str, *, rubric=None, max_tokens: int = 96,
              tokenizer=None, check_reasoning: bool = False) -> tuple[list[dict], dict]:
    """Rejection sampling over rollouts laid out `group_size` per prompt: per prompt the verified candidate with
    the highest rubric total (ties: the shortest) becomes a record, unless its prompt or its reply (in this
    mode) was kept already (`check_reasoning`: thinking candidates also need a right reasoning). Returns
    (records, statistics)."""
    from ..rl.presets import DEFAULT_RUBRIC
    from ..rl.rubric import Rubric

    tok = tokenizer or ByteTokenizer()
    rubric = rubric or Rubric(DEFAULT_RUBRIC)
    n_prompts = len(samples) // group_size
    st, seen_prompts, seen_replies, records = Stats(prompts=n_prompts, candidates=len(samples)), set(), set(), []
    for uid in range(n_prompts):
        scored = []
        for s in samples[uid * group_size:(uid + 1) * group_size]:
            if not verified(s, tok):
                continue
            if check_reasoning and s.thinking and not reasoning_right(s):
                st.wrong_reasoning += 1
                continue
            info = {"thinking": s.thinking, "truncated": s.truncated, "n_tokens": s.n_generated,
                    "max_tokens": max_tokens * max(s.turns, 1), "transcript": s.transcript}
            total, comps = rubric.score(s.text, s.task, info)
            scored.append((total if total is not None else 0.0, -s.n_generated, s, comps))
        st.verified += len(scored)
        if not scored:
            continue
        st.prompts_verified += 1
        total, _, best, comps = max(scored, key=lambda x: (x[0], x[1]))
        prompt = " ".join(best.task.prompt.split())
        reply = tok.decode([t for t, m in zip(best.ids, best.gen_mask) if m])
        if prompt in seen_prompts or (prompt, reply) in seen_replies:
            st.duplicates += 1
            continue
        seen_prompts.add(prompt)
        seen_replies.add((prompt, reply))
        records.append(record_of(best, domain, source_model,
                                 {"total": total, **{k: v for k, v in comps.items() if v is not None}}))
        st.records += 1
        st.tokens += best.n_generated
        st.reward += total
    return records, st.summary()


@torch.no_grad()
def generate(model, domain: str, cfg: GenerateConfig, source_model: str, tokenizer=None) -> tuple[list[dict], dict]:
    """(records, statistics per mode) of one specialist on its domain's training prompts."""
    from ..rl import tasks as T
    from ..rl.rollout import rollout
    from ..serve.engine import Engine
    from ..serve.sampling import SamplingParams

    tok = tokenizer or ByteTokenizer()
    tasks = T.make_tasks(domain, cfg.prompts, split="train", seed=cfg.seed, difficulty=cfg.difficulty,
                         allow_fewer=True)
    engine = Engine(model, max_batch=cfg.max_batch, eos_id=tok.eos_id, decode=tok.decode,
                    vocab_limit=min(tok.vocab_size, model.cfg.vocab_size))
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    was_training = model.training
    model.eval()
    records, stats = [], {}
    try:
        for mode in cfg.modes:
            torch.manual_seed(cfg.seed + (0 if mode == "thinking" else 1))
            n = cfg.thinking_samples if mode == "thinking" and cfg.thinking_samples else cfg.samples
            samples = rollout(engine, tok, tasks, group_size=n, params=params, thinking=MODES[mode],
                              max_turns=cfg.max_turns)
            recs, stats[mode] = best_of_n(samples, n, domain, source_model, max_tokens=cfg.max_tokens,
                                          tokenizer=tok, check_reasoning=cfg.check_reasoning)
            records += recs
            if mode == "non_thinking" and cfg.negatives:
                negs = negative_records(samples, n, domain, source_model, cfg.negatives, tok)
                stats[mode]["negatives"] = len(negs)
                records += negs
    finally:
        model.train(was_training)
    if cfg.fill_non_thinking and "non_thinking" in stats:
        extra = direct_records(records)
        stats["non_thinking"].update(from_thinking=len(extra), records=stats["non_thinking"]["records"] + len(extra))
        records += extra
    return records, stats


def negative_records(samples: list, group_size: int, domain: str, source_model: str, limit: int,
                     tokenizer=None) -> list[dict]:
    """Failed non-thinking replies as negative records (`"negative": true`): per prompt the first candidate that
    does not verify, ended with EOS and renders back to exactly its tokens, up to `limit` prompts in order.

    Why: a distilled tiny generalist wrote `x</think>y` after the non-thinking opener only in states its records
    never show, e.g. after a tool output `no entry for Kaho` from a wrong lookup (3 of 100 held-out tool replies).
    A specialist's own failures reach such states; trained with the block penalty alone (no cross-entropy: the
    replies are wrong), they teach the format there without teaching the wrong answers."""
    from ..train.sft import record_example

    tok = tokenizer or ByteTokenizer()
    out = []
    for uid in range(len(samples) // group_size):
        if len(out) >= limit:
            break
        for s in samples[uid * group_size:(uid + 1) * group_size]:
            if s.thinking or s.truncated or verified(s, tok):
                continue
            rec = {**record_of(s, domain, source_model, {"verified": False}), "negative": True}
            if record_example(rec, tok).ids != list(s.ids):   # e.g. a `</think>` in the reply: escaped on render
                continue
            out.append(rec)
            break
    return out


def direct_records(records: list[dict]) -> list[dict]:
    """Non-thinking records for the prompts that have a verified thinking record and no non-thinking one: the
    thinking transcript with every reasoning dropped (tagged `"from_mode": "thinking"`).

    Why: a specialist answers hard prompts directly far less often than it solves them with reasoning (tiny math:
    0.15 vs 0.7 held-out), so verified non-thinking records are few, and a generalist distilled on mostly
    thinking records sees the non-thinking opener too rarely to stop writing reasoning after it. Balancing the
    modes prompt for prompt gives the direct-answer format as many examples as the reasoning one. The
    statistics' `mean_length` / `mean_reward` stay those of the generated records."""
    def prompt(r: dict) -> str:
        return next(m["content"] for m in r["messages"] if m["role"] == "user")

    have = {prompt(r) for r in records if r["mode"] == "non_thinking" and not r.get("negative")}
    out = []
    for r in records:
        if r["mode"] != "thinking" or prompt(r) in have:
            continue
        have.add(prompt(r))
        messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in r["messages"]]
        out.append({**r, "messages": messages, "reasoning_content": None, "mode": "non_thinking",
                    "from_mode": "thinking"})
    return out


def stats_path(jsonl) -> Path:
    p = Path(jsonl)
    return p.with_name(p.name.removesuffix(".jsonl") + ".stats.json")


def main(argv: list[str]) -> int:
    """`dsv32 distill generate`: records to --out, statistics to <out>.stats.json."""
    from ..rl.tasks import DOMAINS
    from ..train.stages import build_model

    d = GenerateConfig()
    p = argparse.ArgumentParser(prog="dsv32 distill generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="the specialist (a save_pretrained or run directory)")
    p.add_argument("--domain", required=True, help=f"its domain: {', '.join(DOMAINS)}")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--source-name", default=None, help="source_model in the records (default: the --model path)")
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--samples", type=int, default=d.samples, help="candidates per prompt (best of N)")
    p.add_argument("--thinking-samples", type=int, default=d.thinking_samples,
                   help="candidates per prompt in thinking mode (default: --samples)")
    p.add_argument("--no-check-reasoning", action="store_true",
                   help="keep thinking answers whose final answer verifies even when a step is wrong")
    p.add_argument("--negatives", type=int, default=d.negatives,
                   help="keep up to N failed non-thinking replies as negative records (block penalty only)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--difficulty", type=int, default=d.difficulty)
    p.add_argument("--modes", default="thinking,non_thinking")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.domain not in DOMAINS:
        raise ValueError(f"--domain {args.domain!r}: choose one of {', '.join(DOMAINS)}")
    cfg = GenerateConfig(prompts=args.prompts, samples=args.samples, thinking_samples=args.thinking_samples,
                         check_reasoning=not args.no_check_reasoning, negatives=args.negatives,
                         temperature=args.temperature,
                         max_tokens=args.max_tokens, difficulty=args.difficulty, seed=args.seed,
                         modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()))
    model = build_model(init_from=args.model)
    records, stats = generate(model, args.domain, cfg, args.source_name or str(args.model))
    write_jsonl(args.out, records)
    write_json(stats_path(args.out), {"domain": args.domain, "config": asdict(cfg), "modes": stats})
    for mode, s in stats.items():
        per = s["candidates"] // max(s["prompts"], 1)
        print(f"{args.domain:10} {mode:13} {s['records']:5d} records from {s['prompts']} prompts x {per} (verified "
              f"{s['verified_rate']:.2f}, wrong reasoning {s['wrong_reasoning']}, yield {s['prompt_yield']:.2f}, "
              f"dup {s['duplicates']}, len {s['mean_length']:.1f})", flush=True)
    print(f"distill generate: wrote {args.out}", flush=True)
    return 0
