"""GRPO data-parallel under torchrun: rollouts on every rank, the policy trained with FSDP2.

    torchrun --nproc-per-node 2 -m dsv32 rl --preset tiny-math --init-from runs/sft/final --out runs/rl2

`dsv32 rl` picks `DistributedGRPOTrainer` when it runs on several ranks. What differs from `GRPOTrainer`:

- Rollouts: each rank samples its share of every step's prompt groups (whole groups: a group's advantages
  need all of its samples) with an unsharded replica of the policy, so the engine runs without any
  collective. The replica (and the reference, when there is one) is refreshed from the FSDP policy after
  every update (`dsv32.distributed.copy_weights`: one all-gather).
- Sampling is seeded per request from (run seed, step, prompt, occurrence), so a sample does not depend on
  the rank that drew it or on what else was in the batch: N ranks draw what one process draws.
- Update: every rank takes the same number of optimizer steps (FSDP's collectives run in lockstep). Each
  minibatch's loss is scaled by n_rank · W / n_global (sequences, or tokens under token_mean), so the
  ranks' averaged gradient is the gradient of one process's loss on the union of the ranks' minibatches.
  A rank with nothing in a minibatch that others have samples in runs a stand-in sample with weight 0.
- Decisions: logs are combined over ranks (`distributed.mean_logs`), so the guard sees the same numbers
  and takes the same decisions everywhere; stops are also agreed explicitly (`ctx.any`). Checkpoints are
  DCP shards (resume on any number of ranks), `final/` one consolidated Hugging Face directory.

Evaluation (before/after, the guard's held-out sets) is greedy and split over the ranks, the results combined.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections import Counter

from .. import distributed as D
from ..serve.sampling import SamplingParams
from .trainer import GRPOTrainer


def request_seed(run_seed: int, step: int, prompt: list[int], occurrence: int) -> int:
    """A 63-bit sampling seed from what identifies a request, independent of rank and batch."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{run_seed}:{step}:{occurrence}:".encode())
    h.update(",".join(map(str, prompt)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


class SeededEngine:
    """The engine with one generator per sampled request (`request_seed`); greedy requests pass unchanged."""

    def __init__(self, engine, trainer: GRPOTrainer):
        self.engine, self.trainer = engine, trainer

    def generate(self, prompts, params):
        rows = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        seen: Counter = Counter()
        per = []
        for p, sp in zip(prompts, rows):
            key = tuple(p)
            per.append(sp if sp.temperature == 0 else dataclasses.replace(
                sp, seed=request_seed(self.trainer.cfg.seed, self.trainer.step, list(key), seen[key])))
            seen[key] += 1
        return self.engine.generate(prompts, per)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class DistributedGRPOTrainer(GRPOTrainer):
    """GRPO with rollouts on every rank and the policy under FSDP2; pass the unsharded model (it is sharded here).

    Also runs in one process (world size 1): then it is `GRPOTrainer` with a separate rollout replica and
    seeded sampling, the reference point of the N-rank run.
    """

    def __init__(self, model, cfg, out_dir, tokenizer=None, metrics=None, ctx: D.DistContext | None = None):
        ctx = ctx or D.current()
        if cfg.prompts_per_step % ctx.world_size:
            raise ValueError(f"rl: prompts_per_step={cfg.prompts_per_step} is not a multiple of the {ctx.world_size} "
                             f"processes; each rank samples whole groups (--prompts_per_step={ctx.world_size * 2})")
        if D.is_sharded(model):
            raise ValueError("DistributedGRPOTrainer: pass the unsharded model; the trainer keeps an unsharded "
                             "rollout replica and shards the policy itself")
        self.ctx = ctx
        self._scales: list[float] = []
        model.to(ctx.device)   # first: the trainer collates on the policy's device, the replicas copy it
        super().__init__(model, cfg, out_dir, tokenizer, metrics or (None if ctx.is_main else D.NullMetrics()))
        self.replica = copy.deepcopy(model).eval().requires_grad_(False)
        D.parallelize(model, ctx)   # rank 0's weights everywhere, then FSDP2 (a move to the device in one process)
        self.optimizer = self._build_optimizer()   # over the sharded parameters
        self.engine.model = self.replica           # the engine samples from the local replica ...
        self.engine = SeededEngine(self.engine, self)  # ... with rank-independent per-request seeds
        D.copy_weights(self.model, self.replica)       # rank 0's weights (a resume reloads both)
        if self.ref is not None:
            D.copy_weights(self.model, self.ref)

    # ------------------------------------------------------------------ hooks of GRPOTrainer
    def _share(self, tasks: list, modes: list) -> tuple[list, list]:
        """This rank's contiguous share of the step's prompt groups (and their modes)."""
        n = len(tasks) // self.ctx.world_size
        lo = self.ctx.rank * n
        return tasks[lo:lo + n], modes[lo:lo + n]

    def _minibatch_weight(self, samples, chunk: list[int]) -> float:
        if self.loss_cfg.aggregation == "token_mean":
            return float(sum(samples[i].n_generated for i in chunk))
        return float(len(chunk))

    def _minibatches(self, order: list[int], samples) -> list[list[int]]:
        """`cfg.minibatches` slices on every rank; a slice empty everywhere is dropped everywhere, one empty
        only here becomes a weight-0 stand-in; `_loss_scale` gives each its share of the global loss."""
        M, W = self.cfg.minibatches, self.ctx.world_size
        local = [order[i::M] for i in range(M)]
        weights = [self._minibatch_weight(samples, c) for c in local]
        totals = [self.ctx.sum(w) for w in weights]
        chunks, self._scales = [], []
        for c, w, total in zip(local, weights, totals):
            if total == 0:
                continue
            chunks.append(c or [0])
            self._scales.append(w * W / total if c else 0.0)
        return chunks

    def _loss_scale(self, j: int) -> float:
        return self._scales[j]

    def evaluate(self, tasks: list, thinking: bool | None = None) -> dict:
        """Greedy held-out evaluation split over the ranks (tasks[rank::W]), the results combined weighted by
        their counts: the same dict on every rank, as one process evaluating all the tasks would give."""
        W = self.ctx.world_size
        if W == 1 or len(tasks) < W:
            return super().evaluate(tasks, thinking)
        parts = self.ctx.gather(super().evaluate(tasks[self.ctx.rank::W], thinking))
        n = sum(p["n"] for p in parts)
        return {k: n if k == "n" else sum(p[k] * p["n"] for p in parts) / n for k in parts[0]}

    def _load(self, ck, guard_too: bool) -> None:
        super()._load(ck, guard_too)
        D.copy_weights(self.model, self.replica)   # resumed or rolled back: sample from those weights

    def _adopt(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        D.copy_weights(self.model, self.replica)

    # ------------------------------------------------------------------ the step and the run
    def train_step(self) -> dict:
        logs = super().train_step()
        D.copy_weights(self.model, self.replica)   # the next rollout samples from the updated policy
        return D.mean_logs(logs, self.ctx)

    def train(self, resume: bool = True, progress: bool = True) -> dict:
        return super().train(resume=resume, progress=progress and self.ctx.is_main)
