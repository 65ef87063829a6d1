"""RL run configs and presets (plain dataclasses and functions; `dsv32 rl --preset NAME --key=value ...`).

    cfg = presets.get("tiny-math").replace(**{"loss.beta": 0.001, "steps": 50})

Defaults follow rl-distill-anchors.md §6.3 scaled to a 4M-parameter byte model on a CPU: group-mean
advantages without std (V3.2), Clip-Higher 0.2/0.28, per-sequence token mean (V3.2), β = 0 for math and
a weak KL elsewhere (V3.2 §3.1: "weak or no KL for mathematics"), two minibatches per rollout (so OPSM
has something to mask), Keep Sampling Mask and Keep Routing always on. The learning rate is far above
the 1e-6 of billion-parameter runs: a tiny model needs it to move within minutes. It is also the ceiling: a
fresh AdamW's first steps move every weight by about lr in the sign of its gradient, and from an SFT'd tiny
model lr >= 2e-4 lowers held-out math accuracy within a few steps (measured 0.51 -> 0.15 at 2e-4, -> 0.10 at
5e-4, even when only positive advantages are kept), while 1e-4 with a 10-step warm-up climbs (0.51 -> 0.675
in 100 steps).

Presets:
    tiny-math       multi-step arithmetic, thinking mode (issue 6 acceptance: held-out accuracy +15 points)
    tiny-tool       calculator / lookup tool use, thinking mode (tool-task success +15 points)
    tiny-hack       math with a deliberately hackable length-loving judge and the guard on (the guard demo)
    tiny-countdown, tiny-logic, tiny-alignment   the other specialists' domains (issue 7)
    tiny-mixed      every domain in one run, all rewards (V3.2's mixed RL stage)
    tiny-speciale   math only, relaxed length penalty (larger budget, smaller weight), β = 0, self-verification
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from .guard import GuardConfig
from .loss import LossConfig
from .tasks import DOMAINS

REASONING_WEIGHTS = {"correctness": 1.0, "format": 0.2, "length": 0.2, "language": 0.1}
DEFAULT_RUBRIC = {
    "math": REASONING_WEIGHTS, "countdown": REASONING_WEIGHTS, "logic": REASONING_WEIGHTS,
    "tool": {"tool": 1.0, "tool_grounding": 0.3, "format": 0.2, "length": 0.2, "language": 0.1},
    "alignment": {"alignment": 1.0, "format": 0.2, "length": 0.2, "language": 0.1},
}


@dataclass
class RLConfig:
    name: str = "tiny-math"
    domains: dict = field(default_factory=lambda: {"math": 1})   # domain -> weight in the prompt mix
    difficulty: int = 1
    thinking: bool | str = True        # True, False, or "both" (prompts alternate between the two modes)
    n_train_tasks: int = 1000          # training prompts per unit of domain weight (a cursor walks them)
    prompts_per_step: int = 16
    group_size: int = 8                # G samples per prompt
    minibatches: int = 2               # slices of a rollout, one optimizer step each
    epochs: int = 1                    # passes over the rollout (TRL num_iterations); updates = minibatches × epochs
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64               # per model turn
    max_turns: int = 3                 # model turns per sample in the tool loop
    lr: float = 1e-4                   # see the module docstring: 2e-4 already degrades a tiny SFT'd model
    warmup_steps: int = 2
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)        # AdamW (β1, β2)
    grad_clip: float = 1.0
    steps: int = 60                    # rollout steps (each: minibatches optimizer steps)
    minutes: float = 0.0               # wall-clock budget of the training loop; 0 = none
    lr_decay: str = "none"             # "cosine": lr to 0 at the end of `steps` or of `minutes`, whichever is first
    advantage: str = "group_mean"      # group_mean | group_mean_std | batch_std | rloo | process (per-step credit)
    mask_truncated: bool = False       # drop truncated samples from the loss (else the length reward hits them)
    entropy_target: float = 0.0        # > 0: adaptive entropy coefficient (raised only below this entropy, nats)
    loss: LossConfig = field(default_factory=LossConfig)
    beta_by_domain: dict = field(default_factory=lambda: {"math": 0.0, "countdown": 0.0})  # else loss.beta
    rubric: dict = field(default_factory=lambda: {d: dict(w) for d, w in DEFAULT_RUBRIC.items()})
    length_budget: int = 0             # L_max of the soft overlong penalty; 0 = max_tokens
    ref_refresh: int = 0               # replace the reference by the policy every N steps (R1: 400); 0 = never
    ema: float = 0.0                   # > 0: an EMA of the policy (this decay per step, from the start weights) is
                                       # the run's model: evaluated after, exported to final/; 0 = the last policy
    eval_n: int = 200                  # held-out problems per domain for the before/after accuracy (greedy)
    eval_sets: dict = field(default_factory=dict)  # guard held-out sets: name -> {"domain", "difficulty"}; {} = auto
    guard: GuardConfig | None = None
    guard_demo: bool = False           # report this run as `rl.guard_demo`
    ckpt_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if isinstance(self.guard, dict):
            self.guard = GuardConfig(**self.guard)
        bad = sorted(set(self.domains) - set(DOMAINS))
        checks = [
            ("domains", self.domains and not bad and all(w > 0 for w in self.domains.values()),
             f"must map known domains ({', '.join(DOMAINS)}) to positive weights; unknown: {bad}"),
            ("difficulty", self.difficulty in (1, 2, 3), "must be 1, 2 or 3"),
            ("thinking", self.thinking in (True, False, "both"), 'must be true, false or "both"'),
            ("prompts_per_step", self.prompts_per_step >= 1, "must be >= 1"),
            ("group_size", self.group_size >= 2, "must be >= 2 (a group needs a baseline)"),
            ("minibatches", 1 <= self.minibatches <= self.prompts_per_step * self.group_size,
             "must be in [1, prompts_per_step * group_size]"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0 for sampling"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("max_turns", self.max_turns >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("minutes", self.minutes >= 0, "must be >= 0 (0: no budget)"),
            ("lr_decay", self.lr_decay in ("none", "cosine"), 'must be "none" or "cosine"'),
            ("advantage", self.advantage in ("group_mean", "group_mean_std", "batch_std", "rloo", "process"),
             "must be group_mean, group_mean_std, batch_std, rloo or process"),
            ("eval_n", self.eval_n >= 1, "must be >= 1"),
            ("ckpt_every", self.ckpt_every >= 1, "must be >= 1"),
            ("ema", 0 <= self.ema < 1, "must be in [0, 1) (0: off; 0.99 averages about the last 100 steps)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r} {why}")
        if self.loss.aggregation == "dr_grpo" and self.loss.max_len is None:
            self.loss = dataclasses.replace(self.loss, max_len=self.max_tokens * self.max_turns)

    @property
    def modes(self) -> list[bool]:
        """The thinking modes this run trains and evaluates, the headline mode first."""
        return [True, False] if self.thinking == "both" else [bool(self.thinking)]

    def beta(self, domain: str) -> float:
        return float(self.beta_by_domain.get(domain, self.loss.beta))

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **overrides) -> "RLConfig":
        """A copy with dotted overrides (`loss.beta`, `guard.eval_every`, `domains`, ...); unknown keys are errors."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            keys = dotted.split(".")
            target = d
            for key in keys[:-1]:
                if key == "guard" and target.get("guard") is None:
                    target["guard"] = asdict(GuardConfig())
                if not isinstance(target.get(key), dict):
                    raise ValueError(f"rl override '{dotted}': '{key}' is not a section (sections: loss, guard, "
                                     "domains, rubric, beta_by_domain, eval_sets)")
                target = target[key]
            if keys[-1] not in target and keys[0] not in ("domains", "rubric", "beta_by_domain", "eval_sets"):
                raise ValueError(f"rl override '{dotted}': unknown key '{keys[-1]}'; valid keys here: "
                                 f"{', '.join(sorted(target))}")
            target[keys[-1]] = value
        return RLConfig(**d)


def tiny_math() -> RLConfig:
    """Issue 6's math bar: 10 minutes on 2 CPU cores from the `tiny-rl` SFT base (`dsv32.train.sft.RECIPES`): its
    step-150 checkpoint, the first whose replies are well-formed (format reward 0.98; held-out greedy 0.26). One
    minibatch of 32 prompts x 8 samples per step: a rollout is cheap next to the update, and a larger batch per
    optimizer step is steadier than more, smaller steps at this learning rate. Every generated training problem
    is in the pool (1570 at difficulty 1).

    The run's model is an EMA of the policy (decay 0.98, from the start weights). The last policy's held-out
    accuracy swings by +-5 points from one evaluation to the next. The EMA averages those swings out: from the
    step-175 checkpoint (0.55), the last policy read 0.58 / 0.55 / 0.61 / 0.585 / 0.565 at steps 50-250 and the
    EMA 0.66 / 0.65 / 0.67 / 0.68 / 0.675.
    Measured (10 minutes, `dsv32 rl --preset tiny-math --init-from B/step_00000150 --seed S`, one thread each on
    a machine running three or four jobs, so only 80-157 steps): 0.26 -> 0.445 (seed 0), 0.27 -> 0.45 (seed 1),
    0.25 -> 0.495 (seed 2; the last policy 0.425)."""
    return RLConfig(name="tiny-math", domains={"math": 1}, prompts_per_step=32, minibatches=1, warmup_steps=10,
                    n_train_tasks=4000, steps=600, minutes=10, ema=0.98)


def tiny_tool() -> RLConfig:
    """Issue 6's tool bar: the calculator / lookup loop, 10 minutes, from the `tiny-rl-tool` SFT base continued on
    tool tasks alone (`dsv32.train.sft.RECIPES`). A tool conversation is ~3x a math one, so 16 prompts per step.
    Measured: held-out tool success 0.505 -> 0.705 in 82 steps (10 minutes)."""
    return RLConfig(name="tiny-tool", domains={"tool": 1}, prompts_per_step=16, minibatches=1, warmup_steps=10,
                    max_tokens=48, steps=400, minutes=10)


def tiny_hack() -> RLConfig:
    """The guard demo: the only train reward is a judge that loves long answers (`rewards.length_judge`), so
    the policy pads its answers, held-out accuracy falls, and the guard must fire and roll back."""
    # lr 2e-4, twice the default: an aggressive run, so the hack shows within the first guard evaluations.
    return RLConfig(name="tiny-hack", domains={"math": 1}, rubric={"*": {"length_judge": 1.0}}, guard_demo=True,
                    lr=2e-4,
                    guard=GuardConfig(eval_every=4, eval_subset=64, tolerance=0.1, hack_reward_rise=0.05,
                                      hack_eval_drop=0.03, max_rollbacks=2, lr_gamma=0.5, beta_factor=2.0))


def tiny_domain(domain: str) -> RLConfig:
    return RLConfig(name=f"tiny-{domain}", domains={domain: 1})


def tiny_mixed() -> RLConfig:
    return RLConfig(name="tiny-mixed", domains={d: 1 for d in DOMAINS}, loss=LossConfig(beta=0.001),
                    prompts_per_step=10)


def tiny_speciale() -> RLConfig:
    """Math only with a relaxed length penalty: twice the token budget, half the penalty weight, β = 0; and
    DeepSeekMath-V2's self-verification term (`rewards.self_verification`): a right answer with a right
    self-check scores more than a right answer alone, so RL keeps the longer, checked reasoning it was taught."""
    rubric = {"*": {**REASONING_WEIGHTS, "length": REASONING_WEIGHTS["length"] / 2, "self_verification": 0.5}}
    return RLConfig(name="tiny-speciale", domains={"math": 1}, rubric=rubric, max_tokens=128, length_budget=128,
                    loss=LossConfig(beta=0.0), beta_by_domain={})


PRESETS = {"tiny-math": tiny_math, "tiny-tool": tiny_tool, "tiny-hack": tiny_hack,
           "tiny-countdown": lambda: tiny_domain("countdown"), "tiny-logic": lambda: tiny_domain("logic"),
           "tiny-alignment": lambda: tiny_domain("alignment"), "tiny-mixed": tiny_mixed,
           "tiny-speciale": tiny_speciale}


def get(name: str) -> RLConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown RL preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
