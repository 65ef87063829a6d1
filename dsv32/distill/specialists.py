"""Specialists: GRPO per domain from the SFT'd sparse model, in thinking and then non-thinking mode
(DeepSeek-V3.2 §4 "specialist distillation", rl-distill-anchors.md §1.1: every specialist starts from the same
checkpoint, is trained by RL, and supports both modes; post-training keeps DSA's sparse attention).

    summary = train_specialist("math", "runs/p/sft/final", "runs/p/specialist-math",
                               steps={"thinking": 20, "non_thinking": 8}, report="runs/p/report.json")

One specialist is one model: a GRPO phase per mode (the trainer samples in one mode per run), each phase
resumable (`OUT/<mode>/ckpt`), its before/after held-out accuracy merged into report.json as
`rl.specialist-<domain>-<mode>`, then `OUT/final/`. The RL settings are the domain's preset in
`dsv32.rl.presets` (tool: `tiny-tool`, others `tiny_domain`) with the caller's overrides.
"""

from __future__ import annotations

from pathlib import Path

from ..rl import presets as rl_presets
from ..rl.presets import RLConfig

DOMAINS = ("math", "tool", "logic", "alignment")
MODES = ("thinking", "non_thinking")


def domain_preset(domain: str) -> RLConfig:
    """The RL preset of a specialist's domain."""
    name = f"tiny-{domain}"
    return rl_presets.get(name) if name in rl_presets.PRESETS else rl_presets.tiny_domain(domain)


def specialist_config(domain: str, mode: str, steps: int, overrides: dict | None = None) -> RLConfig:
    """GRPO config of one specialist phase: the domain preset, one mode, `steps` rollout steps, overrides."""
    if mode not in MODES:
        raise ValueError(f"specialist mode {mode!r}: choose thinking or non_thinking")
    base = domain_preset(domain)
    return base.replace(**{"name": f"specialist-{domain}-{mode.replace('_', '-')}", "thinking": mode == "thinking",
                           "steps": steps, **(overrides or {})})


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
    log(f"  rl {cfg.name}: held-out {summary['before']:.3f} -> {summary['after']:.3f} in {summary['steps']} steps "
        f"({summary['seconds']:.0f} s)")
    return summary


def train_specialist(domain: str, init_from, out_dir, steps: dict[str, int], overrides: dict | None = None,
                     report=None, log=print) -> dict:
    """GRPO of one domain's specialist in each mode of `steps` (mode -> rollout steps; 0 skips a mode);
    writes OUT/final/ and returns {mode: run summary}."""
    from ..train.stages import build_model

    if domain not in DOMAINS and f"tiny-{domain}" not in rl_presets.PRESETS:
        raise ValueError(f"specialist domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    out = Path(out_dir)
    model = build_model(init_from=init_from)
    runs = {}
    for mode, n in steps.items():
        if n > 0:
            runs[mode] = run_rl(model, specialist_config(domain, mode, n, overrides), out / mode, report, log)
    if not runs:
        raise ValueError(f"specialist {domain}: no RL steps in any mode ({steps}); give thinking and/or non_thinking > 0")
    model.save_pretrained(out / "final")
    return runs
