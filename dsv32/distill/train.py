"""Distillation of the specialists into one generalist (`dsv32 distill train`, rl-distill-anchors.md §4.1–4.3).

    dsv32 distill train --init-from runs/p/sft/final --data math.jsonl --data tool.jsonl --out runs/gen
    dsv32 distill train --init-from DIR --data all.jsonl --out DIR --on-policy-steps 20 \\
        --teacher math=runs/p/specialist-math/final --teacher tool=runs/p/specialist-tool/final
    torchrun --nproc-per-node 2 -m dsv32 distill train --init-from DIR --data all.jsonl --out DIR   # data-parallel

1. Sequence-level distillation: SFT on the union of the specialists' records, both modes, loss masks from the
   chat template (`dsv32.train.sft`: the records' `mode` picks the thinking or non-thinking opener).
2. Optional on-policy distillation (Thinking Machines' recipe, §4.3): the student samples; the teacher of the
   sample's domain scores the student's own tokens; the per-token advantage is the negative reverse KL
   A_t = -coef · (log π_S(o_t) - log π_T(o_t)), trained with the on-policy policy gradient
   loss = -Σ_t A_t · log π_S(o_t) / Σ_t 1 (the importance ratio is 1: one update per sample). Its expectation
   under π_S is -coef · KL(π_S || π_T) ≤ 0 per token, and its gradient is that of the reverse KL.

Legend: B samples, T tokens (inputs), V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..data.tokenizer import ByteTokenizer
from ..train import sft
from ..train.metrics import Metrics
from ..train.optim import TrainConfig


def sft_examples(paths: list, tokenizer=None) -> list[sft.Example]:
    """Every record of every file as an SFT example (errors name file:line)."""
    tok = tokenizer or ByteTokenizer()
    out = []
    for path in paths:
        for row in sft.read_records(path):
            try:
                out.append(sft.record_example(row, tok))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{row['_where']}: cannot render the conversation ({e}); check its messages") from None
    return out


def weighted(examples: list[sft.Example], weights: dict | None) -> list[sft.Example]:
    """Each example repeated `weights[its domain]` times (default 1): the mix of the union, set per domain (records
    differ in number and length per domain, so a plain union weights domains by how much their specialist wrote).

    >>> [e.domain for e in weighted([sft.Example([1], [1], "math", True), sft.Example([2], [1], "tool", True)],
    ...                             {"tool": 2})]
    ['math', 'tool', 'tool']
    """
    weights = weights or {}
    bad = {d: w for d, w in weights.items() if not (isinstance(w, int) and w >= 0)}
    if bad:
        raise ValueError(f"distill weights {bad}: each must be a whole number >= 0 (repeats of that domain's records)")
    return [e for e in examples for _ in range(weights.get(e.domain, 1))]


def distill_sft(model, paths: list, cfg: TrainConfig, *, epochs: float | None = None, resume: bool = True,
                metrics: Metrics | None = None, weights: dict | None = None, block_penalty: float = 0.0) -> dict:
    """Sequence-level distillation: SFT of `model` on the union of the record files (in place), for cfg.steps
    optimizer steps or `epochs` passes over the records, whichever is fewer (the schedule follows); `weights`:
    domain -> repeats of its records (`weighted`); `block_penalty`: `sft.make_loss`'s unlikelihood of a
    reasoning block in non-thinking replies."""
    examples = weighted(sft_examples(paths), weights)
    data = sft.SFTData(examples, cfg.seq_len, cfg.seed)
    world = distributed.current().world_size
    if cfg.batch_size > len(data):  # few verified records (a small run): every row in every batch
        if len(data) < world:
            raise ValueError(f"distill: {len(data)} packed rows cannot feed {world} processes; add records or "
                             "run on fewer processes")
        cfg = dataclasses.replace(cfg, batch_size=len(data) // world * world)  # ranks share it evenly
    if epochs is not None:
        steps = max(1, min(cfg.steps, math.ceil(epochs * len(data) / cfg.batch_size)))
        cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps))
    summary = sft.run_sft(model, data, cfg, resume=resume, metrics=metrics, block_penalty=block_penalty)
    modes = {"thinking": sum(e.thinking for e in examples), "non_thinking": sum(not e.thinking for e in examples),
             "negative": sum(not e.learn for e in examples)}   # non-thinking, block penalty only
    return {**summary, "examples": len(examples), "rows": len(data), "target_tokens": data.target_tokens,
            "modes": modes, "domains": data.domains}


# ---------------------------------------------------------------------------------------------- on-policy


@dataclass
class OnPolicyConfig:
    steps: int = 20
    prompts_per_step: int = 16
    temperature: float = 1.0      # the student samples from its raw distribution (the KL is between raw ones)
    max_tokens: int = 64
    max_turns: int = 3
    lr: float = 1e-4
    kl_coef: float = 1.0
    modes: tuple = ("thinking", "non_thinking")   # alternated step by step
    difficulty: int = 1
    n_prompts: int = 512          # training prompts per domain (a cursor walks them)
    seed: int = 0
    domains: list = field(default_factory=list)   # default: the teachers' domains


def reverse_kl_advantages(student_logps_BT: torch.Tensor, teacher_logps_BT: torch.Tensor, mask_BT: torch.Tensor,
                          coef: float = 1.0) -> torch.Tensor:
    """A_t = -coef · (log π_S(o_t) - log π_T(o_t)) on generated tokens (0 elsewhere), no gradient."""
    return (-coef * (student_logps_BT.detach() - teacher_logps_BT.detach()) * mask_BT).detach()


def token_logprobs(model, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor, routes=None) -> torch.Tensor:
    """log π(target_t | prefix) [B, T] under the model's raw softmax."""
    logits_BTV = model(input_ids_BT, routes=routes).float()
    return torch.log_softmax(logits_BTV, -1).gather(-1, targets_BT[..., None]).squeeze(-1)


def teacher_logprobs(teachers: dict, samples: list, batch: dict) -> torch.Tensor:
    """Each sample scored by the teacher of its task's domain (rows grouped by domain: one forward per teacher)."""
    out_BT = torch.zeros_like(batch["mask"])
    by_domain: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.task.domain not in teachers:
            raise ValueError(f"no teacher for domain {s.task.domain!r}; give one with --teacher "
                             f"{s.task.domain}=DIR (teachers: {', '.join(sorted(teachers))})")
        by_domain.setdefault(s.task.domain, []).append(i)
    with torch.no_grad():
        for domain, rows in by_domain.items():
            idx = torch.tensor(rows, device=batch["input_ids"].device)
            out_BT[idx] = token_logprobs(teachers[domain], batch["input_ids"][idx], batch["targets"][idx])
    return out_BT


def on_policy_distill(student, teachers: dict, cfg: OnPolicyConfig, metrics: Metrics | None = None,
                      tokenizer=None, log=print) -> dict:
    """Student rollouts scored by the domain's teacher, trained on the per-token reverse-KL advantage.

    Under torchrun (student `distributed.parallelize`d) each rank samples its share of every step's prompts
    with an unsharded replica of the student (refreshed after each update), and the loss is normalised by
    the global token count so the averaged gradient is one process's on all the prompts."""
    from ..model.moe import MoE
    from ..rl import tasks as T
    from ..rl.rollout import collate, rollout
    from ..serve.engine import Engine
    from ..serve.sampling import SamplingParams

    tok = tokenizer or ByteTokenizer()
    domains = list(cfg.domains or teachers)
    for t in teachers.values():
        t.eval().requires_grad_(False)
    pool = [t for d in domains for t in T.make_tasks(d, cfg.n_prompts, split="train", seed=cfg.seed,
                                                     difficulty=cfg.difficulty, allow_fewer=True)]
    random.Random(cfg.seed).shuffle(pool)
    ctx = distributed.current()
    if cfg.prompts_per_step % ctx.world_size:
        raise ValueError(f"on-policy distillation: prompts_per_step={cfg.prompts_per_step} is not a multiple of the "
                         f"{ctx.world_size} processes; each rank samples an equal share")
    sampler = student
    if distributed.is_sharded(student):  # the engine runs a plain local copy: no collective while sampling
        from ..model import Transformer

        sampler = Transformer(student.cfg).to(next(student.parameters()).device)
        distributed.copy_weights(student, sampler)
    engine = Engine(sampler, max_batch=cfg.prompts_per_step, eos_id=tok.eos_id, decode=tok.decode,
                    vocab_limit=min(tok.vocab_size, student.cfg.vocab_size))
    moe = any(isinstance(layer.ffn, MoE) for layer in student.layers)
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, return_routes=moe)
    opt = torch.optim.AdamW([p for n, p in student.named_parameters() if ".indexer." not in n and p.requires_grad],
                            lr=cfg.lr, weight_decay=0.0)
    device = next(student.parameters()).device
    t0, cursor, history = time.time(), 0, []
    for step in range(1, cfg.steps + 1):
        tasks = [pool[(cursor + i) % len(pool)] for i in range(cfg.prompts_per_step)]
        cursor += cfg.prompts_per_step
        share = cfg.prompts_per_step // ctx.world_size
        tasks = tasks[ctx.rank * share:(ctx.rank + 1) * share]  # this rank's prompts
        mode = cfg.modes[(step - 1) % len(cfg.modes)]
        student.eval()
        samples = rollout(engine, tok, tasks, group_size=1, params=params, thinking=mode == "thinking",
                          max_turns=cfg.max_turns)
        student.train()
        batch = collate(samples, student.cfg.vocab_size, device, cfg.temperature)
        lp_BT = token_logprobs(student, batch["input_ids"], batch["targets"], batch["routes"])
        teacher_BT = teacher_logprobs(teachers, samples, batch)
        mask_BT = batch["mask"]
        adv_BT = reverse_kl_advantages(lp_BT, teacher_BT, mask_BT, cfg.kl_coef)
        n_tok = mask_BT.sum().clamp(min=1)
        loss = distributed.global_mean(-(adv_BT * lp_BT * mask_BT).sum(), mask_BT.sum())  # over all ranks' tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0))
        if not ctx.any(not (math.isfinite(grad_norm) and math.isfinite(loss.item()))):
            opt.step()
        if sampler is not student:
            distributed.copy_weights(student, sampler)
        kl_B = ((lp_BT.detach() - teacher_BT) * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)
        logs = {"loss": loss.item(), "reverse_kl": ((lp_BT.detach() - teacher_BT) * mask_BT).sum().item() / n_tok.item(),
                "grad_norm": grad_norm, "mode_thinking": float(mode == "thinking"),
                "completions/mean_length": sum(s.n_generated for s in samples) / len(samples)}
        for d in {s.task.domain for s in samples}:
            rows = [i for i, s in enumerate(samples) if s.task.domain == d]
            logs[f"teacher_kl/{d}"] = kl_B[rows].mean().item()
        logs = distributed.mean_logs(logs)  # over ranks (each key over the ranks that have it)
        history.append(logs)
        if metrics is not None:
            metrics.log(step, logs)
    student.eval()
    return {"steps": cfg.steps, "seconds": time.time() - t0,
            "reverse_kl_first": history[0]["reverse_kl"] if history else None,
            "reverse_kl_last": history[-1]["reverse_kl"] if history else None}


# ---------------------------------------------------------------------------------------------- command line


def parse_teachers(items: list[str]) -> dict[str, str]:
    """['math=DIR', 'tool=DIR'] -> {'math': 'DIR', 'tool': 'DIR'}."""
    from ..rl.tasks import DOMAINS

    out = {}
    for item in items:
        domain, eq, path = item.partition("=")
        if not eq or not path:
            raise ValueError(f"--teacher {item!r}: write DOMAIN=DIR, e.g. --teacher math=runs/p/specialist-math/final")
        if domain not in DOMAINS:
            raise ValueError(f"--teacher {item!r}: unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
        out[domain] = path
    return out


def parse_weights(items: list[str]) -> dict[str, int]:
    """['tool=3', 'logic=2'] -> {'tool': 3, 'logic': 2}."""
    out = {}
    for item in items:
        domain, eq, n = item.partition("=")
        if not eq or not n.isdigit():
            raise ValueError(f"--weight {item!r}: write DOMAIN=N with N a whole number, e.g. --weight tool=3")
        out[domain] = int(n)
    return out


def main(argv: list[str]) -> int:
    """`dsv32 distill train`: SFT on the records, then optional on-policy distillation; writes OUT/final/.
    Under `torchrun --nproc-per-node N -m dsv32 distill train ...`: data-parallel (FSDP2, DCP checkpoints)."""
    with distributed.session():  # under torchrun: join the process group for this command
        return _main(argv)


def _main(argv: list[str]) -> int:
    from ..train.stages import build_model

    d = sft.RECIPES["tiny"]
    p = argparse.ArgumentParser(prog="dsv32 distill train", description=__doc__.split("\n")[0])
    p.add_argument("--init-from", required=True, metavar="DIR", help="the student's start (e.g. the SFT'd base)")
    p.add_argument("--data", action="append", default=[], metavar="FILE.jsonl", help="records (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--epochs", type=float, default=None, help="at most this many passes over the records")
    p.add_argument("--block-penalty", type=float, default=0.0,
                   help="unlikelihood weight of <think>/</think> inside non-thinking replies (0: off)")
    p.add_argument("--weight", action="append", default=[], metavar="DOMAIN=N",
                   help="repeat a domain's records N times in the mix (repeatable; default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-policy-steps", type=int, default=0, help="on-policy reverse-KL steps after the SFT")
    p.add_argument("--on-policy-lr", type=float, default=OnPolicyConfig.lr)
    p.add_argument("--teacher", action="append", default=[], metavar="DOMAIN=DIR",
                   help="the teacher of a domain for on-policy distillation (repeatable)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the SFT (and, under torchrun, FSDP2 bf16 parameters)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    args = p.parse_args(argv)
    if not args.data:
        raise ValueError("--data: give at least one JSONL file of distillation records (dsv32 distill generate)")
    teachers = parse_teachers(args.teacher)
    if args.on_policy_steps and not teachers:
        raise ValueError("--on-policy-steps needs teachers: --teacher math=DIR (one per domain)")
    torch.manual_seed(args.seed)
    ctx = distributed.current()
    model = distributed.parallelize(build_model(init_from=args.init_from), ctx,
                                    activation_checkpointing=args.activation_checkpointing,
                                    mp_policy=distributed.bf16_policy() if args.bf16 and ctx.enabled else None)
    out = Path(args.out)
    cfg = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      warmup_steps=min(args.warmup_steps, args.steps), out_dir=str(out / "sft"), bf16=args.bf16)
    s = distill_sft(model, args.data, cfg, epochs=args.epochs, resume=not args.no_resume,
                    weights=parse_weights(args.weight), block_penalty=args.block_penalty)
    ctx.print(f"distill train: SFT on {s['examples']} records ({s['modes']['thinking']} thinking, "
              f"{s['modes']['non_thinking']} non-thinking), {s['steps']} steps, final loss {s['final_loss']:.4f}")
    if args.on_policy_steps:
        tmodels = {dom: build_model(init_from=path).to(ctx.device) for dom, path in teachers.items()}
        ocfg = OnPolicyConfig(steps=args.on_policy_steps, lr=args.on_policy_lr, seed=args.seed)
        m = Metrics(out / "on_policy") if ctx.is_main else distributed.NullMetrics()
        try:
            o = on_policy_distill(model, tmodels, ocfg, metrics=m)
        finally:
            m.close()
        ctx.print(f"distill train: on-policy reverse KL {o['reverse_kl_first']:.4f} -> {o['reverse_kl_last']:.4f} "
                  f"in {o['steps']} steps")
    distributed.export_hf(model, out / "final")  # consolidated on rank 0 when sharded
    ctx.print(f"distill train: model in {out / 'final'}")
    return 0
