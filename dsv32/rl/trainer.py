"""`dsv32 rl`: GRPO with DeepSeek-V3.2's stability fixes and the divergence guard (rl-distill-anchors.md §1.2–1.5).

    dsv32 rl --preset tiny-math --init-from runs/sft/final --out runs/rl-math [--steps 60] [--minutes 10]
             [--report runs/report.json] [--loss.beta=0.001] [--guard.eval_every=5] ...

One step: take `prompts_per_step` training tasks, sample `group_size` completions each through the serving
engine (chat template, thinking or not, tool loop for tool tasks), score them with the rubric, compute
group advantages by uid, then take `minibatches` optimizer steps over shuffled slices of the rollout. The
training log-probs replay the sampler's kept sets (Keep Sampling Mask, `logprobs_over_kept`) and MoE routes
(Keep Routing, `model(ids, routes=...)`); π_old is the policy before the first update of the rollout (so the
first minibatch's ratio is exactly 1) and OPSM compares against the engine's own log-probs. A frozen
reference (optionally refreshed) gives the unbiased KL when a domain has β > 0. With `ema` > 0 an exponential
moving average of the policy weights (from the start weights, `torch.optim.swa_utils.AveragedModel`) is the
run's model: evaluated after the run and exported, beside the last policy's accuracy. The guard evaluates held-out
sets every K steps and rolls back to its last good checkpoint (`OUT/good/`) with a lower lr. Checkpoints in
`OUT/ckpt/` resume exactly (weights, optimizer, RNG, task cursor, guard state); `OUT/final/` is the model;
`OUT/report.json` (or `--report`) gets `rl.<run name> = {before, after}` held-out accuracy (greedy).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import shutil
import time
from pathlib import Path

import torch

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..data.chat import parse_assistant
from ..data.tokenizer import ByteTokenizer
from ..model.moe import MoE
from ..serve.engine import Engine
from ..serve.sampling import SamplingParams, logprobs_over_kept
from .. import distributed
from ..train import checkpoint
from ..train.metrics import Metrics
from ..train.optim import ParamGroup, TrainConfig, build_optimizer, clip_grads
from . import report as rl_report
from . import tasks as T
from .advantages import group_advantages, process_advantages
from .guard import DivergenceGuard
from .loss import adaptive_entropy_coef, grpo_loss, token_entropy
from .presets import RLConfig
from .rewards import arithmetic_steps
from .rollout import collate, rollout, safe_decode
from .rubric import Rubric, summarize


def success(sample) -> bool:
    """Held-out success: the reply ended (not truncated) and its final answer verifies (`tasks.verify`, the rule
    `dsv32 eval suites` uses)."""
    content = parse_assistant(sample.text, thinking=sample.thinking)["content"] or ""
    return (not sample.truncated) and bool(content.strip()) and T.verify(sample.task, content.strip())


def token_advantages(samples, tokenizer) -> float:
    """Process supervision (`advantage: process`): set each sample's `token_adv`. The steps of a completion are
    its `a op b = c` lines (reward 1 if the line holds, else 0), then its outcome (the rubric's total);
    `advantages.process_advantages` turns them into one advantage per step, and each generated token of the last
    turn takes the advantage of the first step ending at or after it. Earlier turns (the tool loop) precede every
    step. A completion with no reward gets 0 everywhere. Returns the share of checked lines that hold."""
    steps, ends = [], []
    for s in samples:
        checks = arithmetic_steps(s.text) if s.reward is not None else []
        ends.append([end for end, _ in checks] + [len(s.text)])
        steps.append([float(ok) for _, ok in checks] + [s.reward] if s.reward is not None else [])
    for s, end, adv in zip(samples, ends, process_advantages(steps, [s.uid for s in samples])):
        token_adv = [0.0] * len(s.ids)
        if adv:
            n_turn = next((k for k, g in enumerate(reversed(s.gen_mask)) if not g), len(s.gen_mask))
            start = len(s.ids) - n_turn
            for p in range(start):
                if s.gen_mask[p]:
                    token_adv[p] = adv[0]
            j = 0
            for k in range(n_turn):
                begin = len(safe_decode(tokenizer, s.ids[start:start + k]))   # where token k's text starts
                while j < len(end) and end[j] <= begin:
                    j += 1
                token_adv[start + k] = adv[j] if j < len(end) else 0.0
        s.token_adv = token_adv
    lines = [r for rs in steps for r in rs[:-1]]   # every step but the outcome
    return sum(lines) / len(lines) if lines else 0.0


def policy_logprobs(model, batch: dict, entropy: bool = False, entropy_grad: bool = False):
    """Per-token log-probs [B, T] of the sampled tokens with the sampler's kept sets (Keep Sampling Mask) and MoE
    routes (Keep Routing) replayed, and optionally the entropy [B, T] of that renormalised distribution."""
    limit = batch.get("vocab_limit")   # the sampler never drew ids >= the tokenizer's vocabulary: renormalise likewise
    logits_BTV = model(batch["input_ids"], routes=batch["routes"])[..., :limit].float()
    B, T_, V = logits_BTV.shape
    kept = batch["kept"] if batch["kept"] is None else batch["kept"][..., :V]
    lp = logprobs_over_kept(logits_BTV.reshape(-1, V), batch["targets"].reshape(-1),
                            None if kept is None else kept.reshape(-1, V), batch["temperature"]).view(B, T_)
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            x = logits_BTV / batch["temperature"]
            ent = token_entropy(torch.log_softmax(x if kept is None else x.masked_fill(~kept, -math.inf), -1))
    return lp, ent


class GRPOTrainer:
    def __init__(self, model, cfg: RLConfig, out_dir, tokenizer=None, metrics: Metrics | None = None):
        self.model, self.cfg, self.out = model, cfg, Path(out_dir)
        self.tok = tokenizer or ByteTokenizer()
        self.device = next(model.parameters()).device
        self.rubric = Rubric(cfg.rubric)
        # vocab_limit: the tiny embedding is larger than the byte vocabulary; ids past it would crash decode.
        self.vocab_limit = min(self.tok.vocab_size, model.cfg.vocab_size)
        self.engine = Engine(model, max_batch=cfg.prompts_per_step * cfg.group_size, eos_id=self.tok.eos_id,
                             decode=self.tok.decode, vocab_limit=self.vocab_limit)
        moe = any(isinstance(layer.ffn, MoE) for layer in model.layers)
        self.sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                       max_tokens=cfg.max_tokens, logprobs=True,
                                       return_kept=cfg.top_p < 1 or cfg.top_k > 0, return_routes=moe)
        self.optimizer = self._build_optimizer()
        needs_ref = cfg.loss.beta > 0 or any(b > 0 for b in cfg.beta_by_domain.values())
        self.ref = copy.deepcopy(model).requires_grad_(False) if needs_ref else None
        self.pool = self._pool()
        self.loss_cfg = cfg.loss           # its entropy coefficient adapts when cfg.entropy_target > 0
        self.cursor, self.step, self.before, self.stopped = 0, 0, None, None
        self.progress = 0.0  # share of the run done: steps or time budget, whichever is further (lr_decay)
        self.metrics = metrics or Metrics(self.out)
        self.ema: AveragedModel | None = None   # built in train(), from the weights the engine samples with
        self.guard = None
        if cfg.guard is not None:
            self.guard = DivergenceGuard(cfg.guard, self._guard_sets(), lambda name, items: self.accuracy(items),
                                         save=self._save_good, restore=self._restore_good, log=self.metrics.log)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        tcfg = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), grad_clip=cfg.grad_clip,
                           out_dir=str(self.out))
        # The indexer learns only from its own KL (DSA stage 2), never from the policy loss: frozen here.
        return build_optimizer(self.model, tcfg, [ParamGroup("main", lambda n: ".indexer." not in n)])

    # ------------------------------------------------------------------ data-parallel hooks (rl/distributed.py)
    def _share(self, tasks: list, modes: list) -> tuple[list, list]:
        """The prompt groups this process samples (all of them in one process)."""
        return tasks, modes

    def _minibatches(self, order: list[int], samples) -> list[list[int]]:
        """The rollout's kept samples (shuffled) in `minibatches` non-empty slices, one optimizer step each."""
        m = self.cfg.minibatches
        return [c for c in (order[i::m] for i in range(m)) if c]

    def _loss_scale(self, j: int) -> float:
        """Weight of minibatch j's loss (its share of the global loss when ranks split the rollout)."""
        return 1.0

    # ------------------------------------------------------------------ tasks
    def _pool(self) -> list[T.Task]:
        pool = []
        for domain, weight in self.cfg.domains.items():   # a small domain holds fewer tasks than asked: all of them
            pool += T.make_tasks(domain, self.cfg.n_train_tasks * weight, split="train", seed=self.cfg.seed,
                                 difficulty=self.cfg.difficulty, allow_fewer=True)
        random.Random(self.cfg.seed).shuffle(pool)
        return pool

    def _next_tasks(self) -> list[T.Task]:
        n = self.cfg.prompts_per_step
        out = [self.pool[(self.cursor + i) % len(self.pool)] for i in range(n)]
        self.cursor += n
        return out

    def heldout(self) -> dict[str, list[T.Task]]:
        return {d: T.make_tasks(d, self.cfg.eval_n, split="heldout", seed=self.cfg.seed + 1000,
                                difficulty=self.cfg.difficulty, allow_fewer=True) for d in self.cfg.domains}

    def _guard_sets(self) -> dict[str, list[T.Task]]:
        """The guard's held-out sets: cfg.eval_sets, else each domain at the run's difficulty and one above."""
        spec = self.cfg.eval_sets or {f"{d}-d{k}": {"domain": d, "difficulty": k} for d in self.cfg.domains
                                      for k in sorted({self.cfg.difficulty, min(3, self.cfg.difficulty + 1)})}
        if len(spec) < 2:
            spec = {**spec, f"{next(iter(self.cfg.domains))}-b": {**next(iter(spec.values())), "seed": 1}}
        return {name: T.make_tasks(s["domain"], 4 * self.cfg.guard.eval_subset or 256, split="heldout",
                                   seed=self.cfg.seed + 2000 + s.get("seed", 0), difficulty=s["difficulty"],
                                   allow_fewer=True)
                for name, s in spec.items()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, tasks: list[T.Task], thinking: bool | None = None) -> dict:
        """Greedy held-out accuracy, mean generated length and format rate of a task list (in the run's headline
        mode unless `thinking` is given)."""
        greedy = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens)
        mode = self.cfg.modes[0] if thinking is None else thinking
        samples = rollout(self.engine, self.tok, tasks, group_size=1, params=greedy, thinking=mode,
                          max_turns=self.cfg.max_turns)
        ok = [success(s) for s in samples]
        return {"accuracy": sum(ok) / len(ok), "n": len(ok),
                "length": sum(s.n_generated for s in samples) / len(samples),
                "format": sum(parse_assistant(s.text, thinking=s.thinking)["well_formed"] and not s.truncated
                              for s in samples) / len(samples)}

    def accuracy(self, tasks: list[T.Task]) -> float:
        return self.evaluate(tasks)["accuracy"]

    def evaluate_heldout(self) -> dict:
        """Per domain (and per mode when the run trains both): accuracy is the headline mode's mean over domains."""
        sets, out = self.heldout(), {}
        for mode in self.cfg.modes:
            per = {d: self.evaluate(ts, mode) for d, ts in sets.items()}
            out["thinking" if mode else "non_thinking"] = per
        per = out["thinking" if self.cfg.modes[0] else "non_thinking"]
        return {"accuracy": sum(r["accuracy"] for r in per.values()) / len(per), "domains": per, "modes": out}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"cursor": self.cursor, "before": self.before, "entropy_coef": self.loss_cfg.entropy_coef,
                "stopped": self.stopped,
                "guard": self.guard.state_dict() if self.guard is not None else None}

    def _extras(self) -> dict | None:
        return {"ema": self.ema.state_dict()} if self.ema is not None else None

    def save(self) -> None:
        distributed.checkpoint.save(self.out / "ckpt", self.step, self.model, self.optimizer, self._state(),
                                    checkpoint.rng_state(), self.cfg.to_dict(), keep=2, extras=self._extras())

    def _load(self, ck: checkpoint.Checkpoint, guard_too: bool) -> None:
        distributed.restore(ck, self.model, self.optimizer)   # either checkpoint format, sharded or not
        if self.ema is not None:
            ema = ck.extra("ema")
            if ema is None:
                raise ValueError(f"{ck.path}: no ema.safetensors, but this run has ema={self.cfg.ema}; the checkpoint "
                                 "was written by a run without an EMA (resume it with --ema=0, or use a new --out)")
            self.ema.load_state_dict(ema)
        checkpoint.set_rng_state(ck.rng)
        self.cursor, self.step = int(ck.data["cursor"]), ck.step
        self.loss_cfg = dataclasses.replace(self.loss_cfg, entropy_coef=ck.data.get("entropy_coef", 0.0))
        if guard_too:
            self.before, self.stopped = ck.data.get("before"), ck.data.get("stopped")
            if self.guard is not None and ck.data.get("guard"):
                self.guard.load_state_dict(ck.data["guard"])
        ref_dir = self.out / "ref"
        if self.ref is not None and guard_too and (ref_dir / "config.json").is_file():
            self.ref.load_state_dict(type(self.ref).from_pretrained(ref_dir).state_dict())

    def resume(self) -> bool:
        ck = distributed.checkpoint.load_latest(self.out / "ckpt")
        if ck is None:
            return False
        self._load(ck, guard_too=True)
        self.metrics.log(self.step, {"resumed_from": str(ck.path)})
        return True

    def _save_good(self, step: int) -> None:
        good = self.out / "good"
        distributed.checkpoint.save(good, step, self.model, self.optimizer, self._state(), checkpoint.rng_state(),
                                    self.cfg.to_dict(), keep=0, extras=self._extras())
        keep = self.guard.protected_steps() | {step}
        ctx = distributed.current()
        for path in checkpoint.list_checkpoints(good) if ctx.is_main else []:
            if int(path.name.split("_")[1]) not in keep:
                shutil.rmtree(path, ignore_errors=True)
        ctx.barrier()

    def _restore_good(self, step: int) -> None:
        """Rollback: weights, optimizer, RNG and task cursor of a good checkpoint (the guard keeps its own ledger);
        later resume checkpoints are dropped so a restart cannot resume past the rollback."""
        self._load(distributed.checkpoint.load(self.out / "good" / f"step_{step:08d}"), guard_too=False)
        ctx = distributed.current()
        for path in checkpoint.list_checkpoints(self.out / "ckpt") if ctx.is_main else []:
            if int(path.name.split("_")[1]) > step:
                shutil.rmtree(path, ignore_errors=True)
        ctx.barrier()

    # ------------------------------------------------------------------ one GRPO step
    def _score(self, samples) -> None:
        for s in samples:
            info = {"thinking": s.thinking, "truncated": s.truncated, "n_tokens": s.n_generated,
                    "max_tokens": self.cfg.max_tokens * s.turns, "length_budget": self.cfg.length_budget or None,
                    "transcript": s.transcript}
            s.reward, s.components = self.rubric.score(s.text, s.task, info)

    def _lr(self) -> float:
        warm = min(1.0, (self.step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * min(self.progress, 1.0))) if self.cfg.lr_decay == "cosine" else 1.0
        return self.cfg.lr * warm * decay * (self.guard.lr_scale if self.guard is not None else 1.0)

    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        first = self.cursor
        tasks = self._next_tasks()
        has_tools = any(t.meta.get("tools") for t in tasks)
        modes = [cfg.modes[(first + i) % len(cfg.modes)] for i in range(len(tasks))]   # "both": alternate
        tasks, modes = self._share(tasks, modes)
        samples = rollout(self.engine, self.tok, tasks, group_size=cfg.group_size, params=self.sampling,
                          thinking=modes, max_turns=cfg.max_turns if has_tools else 1)
        t_roll = time.time() - t0
        self._score(samples)
        process = cfg.advantage == "process"
        adv, adv_stats = group_advantages([s.reward for s in samples], [s.uid for s in samples],
                                          "group_mean" if process else cfg.advantage)
        if process:
            adv_stats["process/step_accuracy"] = token_advantages(samples, self.tok)
            adv = torch.tensor([float(any(s.token_adv)) for s in samples])   # 0: no gradient (dropped below)
        logs = {**adv_stats, **summarize([(s.reward, s.components) for s in samples], [s.task for s in samples])}
        lengths = [s.n_generated for s in samples]
        done = [n for n, s in zip(lengths, samples) if not s.truncated]
        logs.update({"completions/mean_length": sum(lengths) / len(lengths), "completions/max_length": max(lengths),
                     "completions/min_length": min(lengths),
                     "completions/clipped_ratio": sum(s.truncated for s in samples) / len(samples),
                     "completions/mean_terminated_length": sum(done) / len(done) if done else 0.0,
                     "train/success": sum(success(s) for s in samples) / len(samples)})
        groups: dict[str, list[int]] = {}
        for s in samples:   # lengths per mode and per domain (rl-distill-anchors.md §6.4)
            groups.setdefault("thinking" if s.thinking else "non_thinking", []).append(s.n_generated)
            groups.setdefault(s.task.domain, []).append(s.n_generated)
        if len(groups) > 2:
            logs.update({f"completions/{k}/mean_length": sum(v) / len(v) for k, v in groups.items()})
        dense_terms = self.loss_cfg.entropy_coef > 0 or cfg.entropy_target > 0
        keep = [i for i, s in enumerate(samples) if not (cfg.mask_truncated and s.truncated)
                and (adv[i] != 0 or cfg.beta(s.task.domain) > 0 or dense_terms)]
        # Samples with zero advantage and no KL/entropy term carry no gradient: dropped (DAPO's dynamic-sampling
        # filter, without refill). The rest are shuffled into `minibatches` slices, one optimizer step each,
        # for `epochs` passes (TRL's num_iterations; the clip keeps later passes near π_old).
        order = [keep[i] for i in torch.randperm(len(keep)).tolist()]
        chunks = self._minibatches(order, samples)
        batches = [{**collate([samples[i] for i in c], self.model.cfg.vocab_size, self.device, cfg.temperature),
                    "vocab_limit": self.vocab_limit} for c in chunks]
        with torch.no_grad():   # π_old for every slice after the first: the policy before this rollout's updates
            olds = [None] + [policy_logprobs(self.model, b)[0] for b in batches[1:]]
        agg: dict[str, float] = {}
        beta_scale = self.guard.beta_scale if self.guard is not None else 1.0
        updates = [(j, epoch) for epoch in range(cfg.epochs) for j in range(len(chunks))]
        for j, epoch in updates:
            chunk, batch, old = chunks[j], batches[j], olds[j]
            for g in self.optimizer.param_groups:
                g["lr"] = self._lr()
            lp, ent = policy_logprobs(self.model, batch, entropy=True,
                                     entropy_grad=self.loss_cfg.entropy_coef > 0 or cfg.entropy_target > 0)
            ref = None
            if self.ref is not None:
                with torch.no_grad():
                    ref = policy_logprobs(self.ref, batch)[0]
            beta_B = torch.tensor([cfg.beta(samples[i].task.domain) * beta_scale for i in chunk], device=self.device)
            if old is None:      # the first slice's first pass: π_old is this very forward (ratio exactly 1)
                old = olds[j] = lp.detach()
            loss, m = grpo_loss(lp, old, adv[chunk].to(self.device) if batch["adv"] is None else batch["adv"],
                                batch["mask"],
                                self.loss_cfg, sampler_logps_BT=batch["sampler_logps"], ref_logps_BT=ref, beta_B=beta_B,
                                entropy_BT=ent)
            (loss * self._loss_scale(j)).backward()
            m["grad_norm"] = clip_grads(self.optimizer)["main"]
            if math.isfinite(m["grad_norm"]) and math.isfinite(m["loss"]):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for k, v in m.items():
                agg[k] = agg.get(k, 0.0) + v / len(updates)
            if cfg.entropy_target > 0:
                entropy = distributed.current().mean({"entropy": m["entropy"]})["entropy"]   # the same on all ranks
                coef = adaptive_entropy_coef(self.loss_cfg.entropy_coef, entropy, cfg.entropy_target)
                self.loss_cfg = dataclasses.replace(self.loss_cfg, entropy_coef=coef)
                agg["entropy_coef"] = coef
        self.step += 1
        if cfg.ref_refresh and self.ref is not None and self.step % cfg.ref_refresh == 0:
            distributed.copy_weights(self.model, self.ref)   # from the policy, sharded or not
            if distributed.current().is_main:   # one writer
                tmp = self.out / ".ref-tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                self.ref.save_pretrained(tmp)
                shutil.rmtree(self.out / "ref", ignore_errors=True)
                tmp.rename(self.out / "ref")
        n_tok = sum(lengths)
        logs.update(agg)
        logs.update({"lr": self._lr(), "step_time": time.time() - t0, "rollout_time": t_roll,
                     "tokens_per_s": n_tok / max(time.time() - t0, 1e-9), "num_samples_trained": len(keep)})
        if not chunks:
            logs.update({"loss": 0.0, "grad_norm": 0.0})
        return logs

    # ------------------------------------------------------------------ the run
    def _adopt(self, state: dict) -> None:
        """Make `state` (a full, unsharded state dict) the policy's weights."""
        self.model.load_state_dict(state)

    def train(self, resume: bool = True, progress: bool = True) -> dict:
        cfg, t_start = self.cfg, time.time()
        if cfg.ema and self.ema is None:   # before a resume, which loads its state; the first update copies
            self.ema = AveragedModel(self.engine.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
            self.ema.update_parameters(self.engine.model)
        if not (resume and self.resume()):
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        if self.before is None:
            self.before = self.evaluate_heldout()
            self.metrics.log(self.step, {"eval_before/accuracy": self.before["accuracy"]})
        if self.guard is not None and self.guard.good is None:
            self.guard.start(self.step)
        bar = _progress(cfg.steps, self.step) if progress else None
        while self.step < cfg.steps and self.stopped != "guard":   # a guard stop is final, also on a rerun
            if cfg.minutes and distributed.current().any(time.time() - t_start > 60 * cfg.minutes):
                self.stopped = "time budget"
                break
            elapsed = time.time() - t_start
            if cfg.lr_decay != "none":   # every rank uses the furthest rank's progress: one lr for the whole job
                self.progress = max(distributed.current().gather(
                    max(self.step / cfg.steps, elapsed / (60 * cfg.minutes) if cfg.minutes else 0.0)))
            logs = self.train_step()
            if self.ema is not None:   # the weights the next rollout samples with: the policy, or its replica
                self.ema.update_parameters(self.engine.model)
            self.metrics.log(self.step, logs)
            if bar is not None:
                bar.n = self.step
                bar.set_postfix(reward=f"{logs.get('reward/mean', float('nan')):.3f}")
            if self.guard is not None:
                d = self.guard.observe(self.step, logs)
                if distributed.current().any(d.stop):   # ranks stop together
                    self.stopped = "guard"
                    break
            if self.step % cfg.ckpt_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        self.save()
        last = None
        if self.ema is not None:   # the last policy's accuracy, then the EMA becomes the run's model
            last = self.evaluate_heldout()
            self.metrics.log(self.step, {"eval_after/accuracy_last_policy": last["accuracy"]})
            self._adopt(self.ema.module.state_dict())
        after = self.evaluate_heldout()
        self.metrics.log(self.step, {"eval_after/accuracy": after["accuracy"]})
        distributed.export_hf(self.model, self.out / "final")   # consolidated on rank 0 when sharded
        summary = {"name": cfg.name, "before": self.before["accuracy"], "after": after["accuracy"],
                   "before_detail": self.before, "after_detail": after, "steps": self.step, "stopped": self.stopped,
                   "seconds": time.time() - t_start}
        if last is not None:
            summary.update(ema=cfg.ema, after_last_policy=last["accuracy"])
        if self.guard is not None:
            summary["guard"] = {"fired": self.guard.total_fired, "alarms": dict(self.guard.fired),
                                "rollbacks": self.guard.rollbacks, "lr_scale": self.guard.lr_scale}
        return summary


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, disable=None, dynamic_ncols=True, leave=False, desc="rl")


# ---------------------------------------------------------------------------------------------- command line

def parse_rl_overrides(rest: list[str]) -> dict:
    """`--loss.beta=0.01` / `--guard.eval_every 5` / `--domains={"math":1}` -> {"loss.beta": 0.01, ...}."""
    from ..train.stages import _value

    out, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"unrecognized argument {arg!r}; RL overrides look like --loss.beta=0.001")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ValueError(f"{arg} needs a value, e.g. {arg}=1")
            val, i = rest[i + 1], i + 1
        out[key.replace("-", "_")] = _value(val)
        i += 1
    return out


def main(argv: list[str]) -> int:
    """`dsv32 rl`; under `torchrun --nproc-per-node N -m dsv32 rl ...` data-parallel (`dsv32.rl.distributed`)."""
    with distributed.session():  # under torchrun: join the process group for this command
        return _main(argv)


def _main(argv: list[str]) -> int:
    from ..train.stages import build_model
    from .distributed import DistributedGRPOTrainer

    p = argparse.ArgumentParser(prog="dsv32 rl", description="GRPO with V3.2's stability fixes and the guard")
    p.add_argument("--preset", default="tiny-math", help="tiny-math, tiny-tool, tiny-hack, ... (dsv32/rl/presets.py)")
    p.add_argument("--init-from", required=True, help="the SFT'd base: a Hugging Face directory or a run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--report", help="report.json to merge the results into (default OUT/report.json)")
    p.add_argument("--no-resume", action="store_true")
    args, rest = p.parse_known_args(argv)
    from .presets import get

    overrides = parse_rl_overrides(rest)
    for key in ("steps", "minutes", "seed"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = get(args.preset).replace(**overrides) if overrides else get(args.preset)
    torch.manual_seed(cfg.seed)
    model = build_model(init_from=args.init_from)
    tok = ByteTokenizer()
    if model.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"--init-from: the model's vocab_size {model.cfg.vocab_size} is smaller than the byte "
                         f"tokenizer's {tok.vocab_size}; RL needs a model trained on dsv32's chat format")
    out, ctx = Path(args.out), distributed.current()
    ctx.print(f"rl {cfg.name}: {cfg.prompts_per_step} prompts x {cfg.group_size} samples, {cfg.minibatches} "
              f"minibatches, {cfg.steps} steps, domains {cfg.domains}, thinking={cfg.thinking}"
              + (f", {ctx.world_size} ranks" if ctx.enabled else ""))
    with Metrics(out) if ctx.is_main else distributed.NullMetrics() as metrics:
        trainer = (DistributedGRPOTrainer if ctx.enabled else GRPOTrainer)(model, cfg, out, tok, metrics)
        summary = trainer.train(resume=not args.no_resume)
    if not ctx.is_main:
        return 0
    report_path = Path(args.report) if args.report else out / "report.json"
    rl_report.write(report_path, summary, metrics_file=out / "metrics.jsonl", guard_demo=cfg.guard_demo)
    g = summary.get("guard")
    print(f"rl {cfg.name}: held-out accuracy {summary['before']:.3f} -> {summary['after']:.3f} in {summary['steps']} "
          f"steps ({summary['seconds'] / 60:.1f} min)" + (f"; guard fired {g['fired']}x, {g['rollbacks']} rollbacks"
                                                           if g else "") + f"; model in {out / 'final'}, report "
          f"{report_path}", flush=True)
    return 0
