"""Specialists: GRPO per domain from the SFT'd sparse model, in thinking and non-thinking mode (DeepSeek-V3.2 §4
"specialist distillation", rl-distill-anchors.md §1.1: every specialist starts from the same checkpoint, is
trained by RL, and supports both modes; post-training keeps DSA's sparse attention).

    summary = train_specialist("math", "runs/p/sft/final", "runs/p/specialist-math", steps=16,
                               report="runs/p/report.json")

A specialist is (1) optionally a short SFT continuation of the shared base on its own domain's worked traces in
both modes (`sft`: `dsv32.train.sft.Recipe` fields; V3.2 fine-tunes every specialist from the same base for its
domain), then (2) one GRPO run with `thinking="both"` (the prompts of a step alternate between the modes, both
are evaluated before and after, so the RL's own gain is on record), resumable (`OUT/sft/`, `OUT/rl/ckpt`), its
held-out accuracy merged into report.json as `rl.specialist-<domain>`, then `OUT/final/`. The RL settings are
the domain's preset in `dsv32.rl.presets` (tool: `tiny-tool`, others `tiny_domain`) with the caller's overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import write_json
from ..rl import presets as rl_presets
from ..rl.presets import RLConfig

DOMAINS = ("math", "tool", "logic", "alignment")


def domain_preset(domain: str) -> RLConfig:
    """The RL preset of a specialist's domain."""
    name = f"tiny-{domain}"
    return rl_presets.get(name) if name in rl_presets.PRESETS else rl_presets.tiny_domain(domain)


def specialist_config(domain: str, steps: int, overrides: dict | None = None) -> RLConfig:
    """GRPO config of one specialist: the domain preset in both modes, `steps` rollout steps, no EMA, then
    overrides. (tiny-math's EMA, decay 0.98, averages over ~50 steps: over a specialist's few steps it would keep
    most of the start weights.)"""
    return domain_preset(domain).replace(**{"name": f"specialist-{domain}", "thinking": "both", "steps": steps,
                                            "ema": 0.0, **(overrides or {})})


def run_rl(model, cfg: RLConfig, out_dir, report=None, log=print) -> dict:
    """One GRPO run on `model` (in place) with its metrics in OUT/metrics.jsonl (not echoed: the pipeline prints
    one line per run); merges `rl.<cfg.name>` into `report` when given."""
    from ..data.tokenizer import ByteTokenizer
    from ..rl import report as rl_report
    from ..rl.trainer import GRPOTrainer
    from ..train.metrics import Metrics

    out = Path(out_dir)
    with Metrics(out, echo=False) as metrics:
        trainer = GRPOTrainer(model, cfg, out, ByteTokenizer(), metrics)
        summary = trainer.train(resume=True, progress=False)
    if report is not None:
        rl_report.write(report, summary, metrics_file=out / "metrics.jsonl")
    log(f"  rl {cfg.name}: held-out {_modes(summary['before_detail'])} -> {_modes(summary['after_detail'])} "
        f"in {summary['steps']} steps ({summary['seconds']:.0f} s)")
    return summary


def _modes(detail: dict) -> str:
    """'0.31/0.25' (thinking/non-thinking mean held-out accuracy over the run's domains), or one number."""
    by = detail.get("modes") or {"": detail["domains"]}
    return "/".join(f"{sum(r['accuracy'] for r in per.values()) / len(per):.2f}" for per in by.values())


def domain_sft(domain: str, init_from, out_dir, settings: dict, log=print, name: str | None = None) -> dict:
    """SFT continuation of `init_from` on one domain's worked traces (both modes unless `settings["mode"]`);
    writes OUT/final/ (skipped when it exists) and returns {"steps", "final_loss", "examples"}."""
    from dataclasses import replace

    from ..train import sft
    from ..train.stages import build_model

    out = Path(out_dir)
    done = out / "summary.json"
    if (out / "final" / "config.json").is_file() and done.is_file():
        return json.loads(done.read_text())
    recipe = replace(sft.Recipe(domains={domain: 1}, mode="both"), **settings)
    model = build_model(init_from=init_from)
    s = sft.run_recipe(model, recipe, out, log_every=max(recipe.steps // 4, 1))
    summary = {"steps": s["steps"], "final_loss": s["final_loss"], "examples": s["examples"]}
    write_json(done, summary)
    log(f"  sft {name or 'specialist-' + domain}: {s['examples']} conversations, {s['steps']} steps, "
        f"loss {s['final_loss']:.3f}")
    return summary


def train_specialist(domain: str, init_from, out_dir, steps: int, overrides: dict | None = None, report=None,
                     log=print, sft: dict | None = None) -> dict:
    """One domain's specialist: the `sft` continuation when given (OUT/sft/), then GRPO; writes OUT/final/ and
    returns the RL run's summary (+ "sft": the continuation's summary or None)."""
    from ..train.stages import build_model

    if domain not in DOMAINS and f"tiny-{domain}" not in rl_presets.PRESETS:
        raise ValueError(f"specialist domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    out = Path(out_dir)
    start, sft_summary = Path(init_from), None
    if sft:
        sft_summary = domain_sft(domain, init_from, out / "sft", sft, log)
        start = out / "sft" / "final"
    model = build_model(init_from=start)
    summary = run_rl(model, specialist_config(domain, steps, overrides), out / "rl", report, log)
    model.save_pretrained(out / "final")
    return {**summary, "sft": sft_summary}
