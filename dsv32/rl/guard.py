"""Divergence guard: periodic held-out evaluation, alarms, and rollback to the last good checkpoint.

Not in the V3.2 paper (rl-distill-anchors.md §0.1, §1.9): our design from the nearest documented practice
(entrenar #127: reload the previous checkpoint, halve the lr, at most 3 rollbacks; GSPO's warning that a
rollback needs an algorithmic change too, hence the optional stronger KL β; verl's per-source validation).

The guard owns no model. The trainer hands it callbacks and calls `observe(step, train_metrics)` after every
optimizer step:

    guard = DivergenceGuard(GuardConfig(eval_every=10), {"math": math_tasks, "logic": logic_tasks},
                            evaluate=lambda name, items: accuracy, save=save_ckpt, restore=load_ckpt, log=log)
    decision = guard.observe(step, {"reward/mean": 0.4, "entropy": 1.2, "kl": 0.01, "loss": 0.1, ...})
    if decision.rolled_back: step = decision.restored_step   # restore() already reloaded weights, optimizer,
    lr = base_lr * guard.lr_scale                            # RNG and data cursor
    if decision.stop: break

Detectors (each an alarm name, logged as `safeguard/alarm/<name>`):
    nonfinite       a NaN/Inf in the loss, grad norm, KL or entropy (checked every step, acts at once)
    entropy_floor   token entropy below `entropy_floor` for `patience` consecutive steps (collapse)
    kl_spike        KL to the reference above `kl_max`, or above `kl_spike_factor` × its running median
    length          mean completion length above `length_factor` × the first steps' mean, or the fraction
                    of truncated completions (`completions/clipped_ratio`) above `clipped_ratio_max`
    eval_drop       mean held-out accuracy more than `tolerance` below the best seen
    hacking         train reward up by > `hack_reward_rise` while held-out accuracy fell by > `hack_eval_drop`,
                    both against the best evaluation so far (R1's helpfulness-RM hacking, §1.9); measured from
                    the best, a slow drift that no single evaluation shows is caught too

Evaluation runs every `eval_every` steps on every held-out set, each on a rotating window of `eval_subset`
items (successive evaluations walk through the whole set, so no fixed subset can be overfitted). A step
whose evaluation raises no alarm becomes the last good checkpoint (`save(step)`). On an alarm: `restore(good)`,
lr × `lr_gamma`, β × `beta_factor`, one rollback counted; once `max_rollbacks` is used up, the next alarm
restores the best good checkpoint (highest held-out mean) and stops the run. The trainer must keep the
checkpoints of `protected_steps()` (the last good and the best) when it prunes old ones.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

ALARMS = ("nonfinite", "entropy_floor", "kl_spike", "length", "eval_drop", "hacking")


@dataclass
class GuardConfig:
    eval_every: int = 10               # K: optimizer steps between evaluations
    eval_subset: int = 100             # items per held-out set per evaluation (rotating window); 0 = whole set
    tolerance: float = 0.05            # eval_drop: allowed drop of mean accuracy below the best (absolute)
    hack_reward_rise: float = 0.05     # hacking: train-reward rise since the last good evaluation ...
    hack_eval_drop: float = 0.02       # ... together with this held-out drop
    entropy_floor: float | None = None # nats; None disables
    patience: int = 2                  # consecutive steps below the entropy floor before the alarm
    kl_max: float | None = None        # absolute KL ceiling; None disables
    kl_spike_factor: float | None = 10.0  # KL above this × running median of the past KL values; None disables
    length_factor: float | None = 3.0  # mean length above this × the first `warmup` steps' mean; None disables
    clipped_ratio_max: float | None = 0.5  # share of truncated completions; None disables
    warmup: int = 3                    # steps that set the length baseline and the KL median before alarms
    lr_gamma: float = 0.5              # lr multiplier per rollback
    beta_factor: float = 1.0           # β multiplier per rollback (> 1: a stronger KL after each rollback)
    max_rollbacks: int = 3

    def __post_init__(self):
        checks = [
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("eval_subset", self.eval_subset >= 0, "must be >= 0 (0: whole set)"),
            ("tolerance", self.tolerance >= 0, "must be >= 0"),
            ("patience", self.patience >= 1, "must be >= 1"),
            ("warmup", self.warmup >= 1, "must be >= 1"),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "must be in (0, 1]"),
            ("beta_factor", self.beta_factor >= 1, "must be >= 1"),
            ("max_rollbacks", self.max_rollbacks >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"GuardConfig.{name}={getattr(self, name)!r} {why}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decision:
    alarms: list[str] = field(default_factory=list)
    evaluated: bool = False
    eval: dict[str, float] = field(default_factory=dict)
    rolled_back: bool = False
    restored_step: int | None = None
    stop: bool = False
    saved: bool = False


def _finite(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and math.isfinite(v))


class DivergenceGuard:
    """Evaluation, detectors and rollback; see the module docstring. All state is in `state_dict()`."""

    def __init__(self, cfg: GuardConfig, sets: dict[str, Sequence], evaluate: Callable[[str, list], float],
                 save: Callable[[int], None], restore: Callable[[int], None],
                 log: Callable[[int, dict], None] | None = None):
        if len(sets) < 1 or any(len(items) == 0 for items in sets.values()):
            raise ValueError(f"DivergenceGuard needs non-empty held-out sets, got sizes "
                             f"{ {k: len(v) for k, v in sets.items()} }; pass at least one (two or more advised)")
        self.cfg, self.sets, self.evaluate = cfg, sets, evaluate
        self._save, self._restore, self._log = save, restore, log or (lambda step, values: None)
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.beta_scale = 1.0
        self.fired: dict[str, int] = {a: 0 for a in ALARMS}
        self.n_evals = 0
        self.best: dict | None = None          # {"step", "eval_mean", "reward", "eval"} of the best good checkpoint
        self.good: dict | None = None          # the same for the last good checkpoint
        self.first_eval: dict | None = None
        self.history: list[dict] = []          # one record per evaluation
        self._rewards: list[float] = []        # train reward per step since the last evaluation
        self._lengths: list[float] = []        # first `warmup` mean lengths (baseline)
        self._kls: list[float] = []
        self._low_entropy = 0

    # ------------------------------------------------------------------ evaluation
    def subset(self, name: str, eval_index: int) -> list:
        """The rotating window of set `name` for evaluation number `eval_index` (wraps around the set)."""
        items = list(self.sets[name])
        n = self.cfg.eval_subset
        if n == 0 or n >= len(items):
            return items
        start = (eval_index * n) % len(items)
        return (items + items)[start:start + n]

    def run_eval(self, step: int) -> dict[str, float]:
        """Evaluate every held-out set on its current window; logs `eval/<set>/acc` and `eval/mean`."""
        acc = {name: float(self.evaluate(name, self.subset(name, self.n_evals))) for name in self.sets}
        self.n_evals += 1
        acc["mean"] = sum(acc[n] for n in self.sets) / len(self.sets)
        self._log(step, {f"eval/{k}/acc" if k != "mean" else "eval/mean": v for k, v in acc.items()})
        return acc

    # ------------------------------------------------------------------ detectors
    def _step_alarms(self, m: dict) -> list[str]:
        cfg, alarms = self.cfg, []
        if not all(_finite(m.get(k)) for k in ("loss", "grad_norm", "kl", "entropy", "reward/mean")):
            return ["nonfinite"]
        ent = m.get("entropy")
        if cfg.entropy_floor is not None and ent is not None:
            self._low_entropy = self._low_entropy + 1 if ent < cfg.entropy_floor else 0
            if self._low_entropy >= cfg.patience:
                alarms.append("entropy_floor")
        kl = m.get("kl")
        if kl is not None:
            spike = cfg.kl_max is not None and kl > cfg.kl_max
            if cfg.kl_spike_factor is not None and len(self._kls) >= cfg.warmup:
                spike |= kl > cfg.kl_spike_factor * max(statistics.median(self._kls), 1e-6)
            if spike:
                alarms.append("kl_spike")
            else:
                self._kls = (self._kls + [kl])[-50:]
        length, clipped = m.get("completions/mean_length"), m.get("completions/clipped_ratio")
        if length is not None and len(self._lengths) < cfg.warmup:
            self._lengths.append(length)
        elif length is not None and cfg.length_factor is not None and \
                length > cfg.length_factor * max(sum(self._lengths) / len(self._lengths), 1.0):
            alarms.append("length")
        if clipped is not None and cfg.clipped_ratio_max is not None and clipped > cfg.clipped_ratio_max \
                and "length" not in alarms:
            alarms.append("length")
        return alarms

    def _eval_alarms(self, acc: dict, reward: float | None) -> list[str]:
        cfg, alarms = self.cfg, []
        best = self.best
        if best is not None and best["eval_mean"] - acc["mean"] > cfg.tolerance:
            alarms.append("eval_drop")
        if best is not None and reward is not None and best["reward"] is not None:
            if reward - best["reward"] > cfg.hack_reward_rise and best["eval_mean"] - acc["mean"] > cfg.hack_eval_drop:
                alarms.append("hacking")
        return alarms

    # ------------------------------------------------------------------ the per-step entry point
    def observe(self, step: int, metrics: dict, force_eval: bool = False) -> Decision:
        """Check this step's train metrics; evaluate every `eval_every` steps; roll back on an alarm."""
        d = Decision(alarms=self._step_alarms(metrics))
        reward = metrics.get("reward/mean")
        if reward is not None and _finite(reward):
            self._rewards.append(float(reward))
            for rec in (self.good, self.best):         # a baseline evaluated before training: its first reward
                if rec is not None and rec["reward"] is None:
                    rec["reward"] = float(reward)
        if not d.alarms and (force_eval or step % self.cfg.eval_every == 0):
            d.evaluated = True
            d.eval = acc = self.run_eval(step)
            window_reward = sum(self._rewards) / len(self._rewards) if self._rewards else None
            self._rewards = []
            d.alarms = self._eval_alarms(acc, window_reward)
            self.history.append({"step": step, "eval": acc, "reward": window_reward, "alarms": list(d.alarms)})
            if self.first_eval is None:
                self.first_eval = self.history[-1]
            if not d.alarms:
                self.good = {"step": step, "eval_mean": acc["mean"], "reward": window_reward, "eval": acc}
                if self.best is None or acc["mean"] > self.best["eval_mean"]:
                    self.best = dict(self.good)
                self._save(step)
                d.saved = True
        for a in d.alarms:
            self.fired[a] += 1
        if d.alarms:
            self._act(step, d)
        self._log(step, self.metrics(d))
        return d

    def start(self, step: int = 0) -> Decision:
        """Evaluate the starting weights and save them as the first good checkpoint (call before training)."""
        return self.observe(step, {}, force_eval=True)

    def _act(self, step: int, d: Decision) -> None:
        if self.good is None:  # nothing to go back to yet: stop rather than train on
            d.stop = True
            return
        self._rewards, self._low_entropy = [], 0
        if self.rollbacks >= self.cfg.max_rollbacks:
            d.stop = True      # cap reached: end the run on the best weights seen
            d.restored_step = self.best["step"]
            self._restore(self.best["step"])
            return
        d.restored_step = self.good["step"]
        self._restore(self.good["step"])
        d.rolled_back = True
        self.rollbacks += 1
        self.lr_scale *= self.cfg.lr_gamma
        self.beta_scale *= self.cfg.beta_factor

    def metrics(self, d: Decision | None = None) -> dict:
        out = {"safeguard/rollbacks": self.rollbacks, "safeguard/current_lr_scale": self.lr_scale,
               "safeguard/beta_scale": self.beta_scale}
        if d is not None:
            out.update({f"safeguard/alarm/{a}": int(a in d.alarms) for a in ALARMS})
            if d.stop:
                out["safeguard/stopped"] = 1
        return out

    def protected_steps(self) -> set[int]:
        """Checkpoint steps a rollback or the final stop may restore: never prune these."""
        return {rec["step"] for rec in (self.good, self.best) if rec is not None}

    @property
    def total_fired(self) -> int:
        return sum(self.fired.values())

    # ------------------------------------------------------------------ checkpointable state
    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "beta_scale": self.beta_scale,
                "fired": dict(self.fired), "n_evals": self.n_evals, "best": self.best, "good": self.good,
                "first_eval": self.first_eval, "history": self.history, "rewards": self._rewards,
                "lengths": self._lengths, "kls": self._kls, "low_entropy": self._low_entropy}

    def load_state_dict(self, s: dict) -> None:
        self.rollbacks, self.lr_scale, self.beta_scale = s["rollbacks"], s["lr_scale"], s["beta_scale"]
        self.fired = {a: int(s["fired"].get(a, 0)) for a in ALARMS}
        self.n_evals, self.best, self.good, self.first_eval = s["n_evals"], s["best"], s["good"], s["first_eval"]
        self.history, self._rewards = list(s["history"]), list(s["rewards"])
        self._lengths, self._kls, self._low_entropy = list(s["lengths"]), list(s["kls"]), s["low_entropy"]
