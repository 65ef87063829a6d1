"""The pipeline's report: OUT/report.json, OUT/report.md and PNG plots (issue 7 "Report").

    path = build("runs/pipeline-tiny", state, models)   # called by `dsv32 pipeline` as its last stage

report.json keeps the sections earlier stages merged into it (`dsa` from the DSA recipe, `rl` from every GRPO
run) and gets:
    eval          model -> domain -> mode -> held-out accuracy (fraction 0–1); models `base`,
                  `specialist-<domain>`, `distilled` (after distillation SFT), `generalist`, `speciale`
    eval_details  model -> domain -> mode -> {mean_length, format_ok, no_reasoning_block, ...}
    timeline      stage -> seconds (plus `total`); timeline_cpu: the same in CPU seconds of the process
    data          generated records: domain -> mode -> {prompts, candidates, verified_rate, records, ...}
    models        model -> {path, change}: relative weight change of each stage against its input
    checks        the issue's acceptance checks on this run's numbers
Plots: timeline.png, accuracy.png, lengths.png (beside the recipe's dsa_*.png and the RL runs' rl_*.png).
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write, pyplot, save_figure, write_json

STAGE_OF_MODEL = {"base": "sft", "distilled": "distill", "generalist": "mixed-rl", "speciale": "speciale"}


def _stage_of(model: str) -> str:
    return STAGE_OF_MODEL.get(model, model)


def load_eval(out: Path, models) -> tuple[dict, dict]:
    acc, details = {}, {}
    for name in models:
        f = out / "eval" / f"{name}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            acc[name] = r["accuracy"]
            details[name] = {d: {m: {k: v for k, v in x.items() if k not in ("examples", "accuracy")}
                                 for m, x in by.items()} for d, by in r["details"].items()}
    return acc, details


def checks(eval_: dict, details: dict, domains, minutes: float | None) -> dict:
    """Acceptance of issue 7 on this run (thinking mode unless named): each a bool with the numbers beside."""
    out = {}

    def a(model, domain, mode="thinking"):
        return eval_.get(model, {}).get(domain, {}).get(mode)

    for d in domains:
        s, b, g = a(f"specialist-{d}", d), a("base", d), a("generalist", d)
        if s is not None and b is not None:
            out[f"specialist_{d}_beats_base_by_10pts"] = {
                "ok": s - b >= 0.10, "specialist": s, "base": b,
                "non_thinking_specialist": a(f"specialist-{d}", d, "non_thinking"),
                "non_thinking_base": a("base", d, "non_thinking")}
        if s is not None and g is not None:   # vacuous when the specialist scores 0: say so
            out[f"generalist_{d}_ge_90pct_of_specialist"] = {"ok": g >= 0.9 * s, "generalist": g, "specialist": s,
                                                             "vacuous": s == 0}
    t, n = a("generalist", "math"), a("generalist", "math", "non_thinking")
    if t is not None and n is not None:
        out["generalist_math_thinking_ge_non_thinking"] = {"ok": t >= n, "thinking": t, "non_thinking": n}
    def clean(model, served, key="no_reasoning_block"):   # worst share of clean non-thinking replies over `served`
        return min((x["non_thinking"].get(key, 1.0) for d, x in details[model].items()
                    if d in served and "non_thinking" in x), default=1.0)

    # A model is held to the domains it serves in non-thinking mode: the generalist (and base, distilled) all of
    # them; a specialist its own (it writes that domain's non-thinking data; off-domain it has forgotten the format
    # along with the skill). Speciale serves thinking mode only (trained on thinking-mode reasoning data alone),
    # so it is not held to the check. The worst over every domain stays in the report for all of them.
    own = {m: [m.removeprefix("specialist-")] if m.startswith("specialist-") else list(details[m])
           for m in details if m != "speciale"}
    if details:
        by_model = {m: clean(m, own[m]) for m in own}
        out["non_thinking_has_no_reasoning_block"] = {
            "ok": all(v == 1.0 for v in by_model.values()), "by_model": by_model, "domains": own,
            "any_domain": {m: clean(m, list(details[m])) for m in details},
            # the sampler bans the markers in non-thinking mode; what the models would have written without it:
            "unbanned": {m: clean(m, own[m], "no_reasoning_block_unbanned") for m in own}}
    sp, g = a("speciale", "math"), a("generalist", "math")
    if sp is not None and g is not None:
        ls = details["speciale"]["math"]["thinking"]["mean_length"]
        lg = details["generalist"]["math"]["thinking"]["mean_length"]
        out["speciale_math_ge_generalist_plus_5pts"] = {"ok": sp >= g + 0.05, "speciale": sp, "generalist": g}
        out["speciale_longer_responses"] = {"ok": ls > lg, "speciale_length": ls, "generalist_length": lg}
    if minutes is not None:
        out["pipeline_within_25_minutes"] = {"ok": minutes <= 25.0, "minutes": minutes}
    return out


def build(out, state: dict, models: dict) -> Path:
    """Write report.json (merged), report.md and the plots; return the path of report.md."""
    out = Path(out)
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    cfg = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").is_file() else {}
    acc, details = load_eval(out, models)
    domains = cfg.get("specialists", {}).get("domains") or sorted({d for by in acc.values() for d in by})
    timeline = {s: round(v["seconds"], 1) for s, v in state.items() if isinstance(v, dict) and "seconds" in v}
    timeline = {("dsa-eval" if s == "dsa" else s): v for s, v in timeline.items()}
    timeline["total"] = round(sum(timeline.values()), 1)
    cpu = {s: round(v["cpu_seconds"], 1) for s, v in state.items() if isinstance(v, dict) and "cpu_seconds" in v}
    if "recipe_cpu_seconds" in state.get("dsa", {}):   # the process that finished the recipe (after a resume: less)
        cpu["dsa-recipe"] = round(state["dsa"]["recipe_cpu_seconds"], 1)
    cpu["total"] = round(sum(cpu.values()), 1)
    report.update({
        "eval": acc, "eval_details": details, "timeline": timeline, "timeline_cpu": cpu,
        "data": state.get("generate", {}).get("stats", {}),
        "models": {m: {"path": str(p), "change": state.get(_stage_of(m), {}).get("change")} for m, p in models.items()},
        "stages": {s: {k: v for k, v in x.items() if k not in ("seconds", "note", "stats")} for s, x in state.items()},
        "pipeline": cfg,
    })
    report["checks"] = checks(acc, details, domains, timeline["total"] / 60)
    write_json(path, report)
    plot_timeline(out, timeline)
    plot_accuracy(out, acc, domains)
    plot_lengths(out, details, domains)
    return atomic_write(out / "report.md", markdown(out, report, domains))


# -- Markdown ------------------------------------------------------------------------------------------------


def markdown(out: Path, r: dict, domains) -> str:
    tl, acc, det = r["timeline"], r["eval"], r["eval_details"]
    lines = [f"# dsv32 pipeline report ({r.get('pipeline', {}).get('name', '')})", "",
             "base pretraining -> DSA stage 1 -> stage 2 -> SFT cold start (`base`) -> specialists by GRPO -> "
             "dual-mode data -> distillation (`distilled`) -> mixed RL (`generalist`) -> Speciale.", "",
             "## Checks", ""]
    for name, c in r.get("checks", {}).items():
        nums = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                         if k not in ("ok", "vacuous", "domains"))
        nums += " (vacuous: the specialist scores 0)" if c.get("vacuous") else ""
        lines.append(f"- {'PASS' if c['ok'] else 'FAIL'} {name}: {nums}")
    lines += ["", "## Held-out accuracy (greedy; thinking / non-thinking)", "",
              "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for m, by in acc.items():
        cells = [f"{by[d]['thinking']:.2f} / {by[d]['non_thinking']:.2f}" if d in by else "" for d in domains]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Mean response length in tokens (thinking / non-thinking):", "",
              "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for m, by in det.items():
        cells = [f"{by[d]['thinking']['mean_length']:.1f} / {by[d]['non_thinking']['mean_length']:.1f}"
                 if d in by else "" for d in domains]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy](accuracy.png) ![lengths](lengths.png)", "", "## Generated data (best of N, verified)",
              "", "| domain | mode | prompts | candidates | verified | prompt yield | duplicates | records | mean length |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d, by in r.get("data", {}).items():
        for mode, s in by.items():
            lines.append(f"| {d} | {mode} | {s['prompts']} | {s['candidates']} | {s['verified_rate']:.2f} | "
                         f"{s['prompt_yield']:.2f} | {s['duplicates']} | {s['records']} | {s['mean_length']:.1f} |")
    lines += ["", "## Timeline", "", "Wall seconds, and the process's CPU seconds (on a shared machine the wall clock "
              "also counts other processes' work; the DSA recipe's CPU time is given for its four stages together, "
              "as spent by the process that finished it).",
              "", "| stage | seconds | CPU seconds | weight change vs its input |", "|---|---|---|---|"]
    stages, cpu = r.get("stages", {}), r.get("timeline_cpu", {})
    for s, sec in tl.items():
        ch, c = stages.get(s, {}).get("change"), cpu.get(s)
        lines.append(f"| {s} | {sec:.0f} | {'' if c is None else f'{c:.0f}'} | {'' if ch is None else f'{ch:.4f}'} |")
    if "dsa-recipe" in cpu:
        lines.append(f"| (DSA recipe, all four stages and its evaluation) | | {cpu['dsa-recipe']:.0f} | |")
    lines += ["", "![timeline](timeline.png)", ""]
    for name in ("report_dsa.md", "rl.md"):
        f = out / name
        if f.is_file():
            text = f.read_text().replace("# RL\n", "## RL runs (held-out accuracy of each run's own check)\n")
            lines += [text.strip(), ""]
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------------


def plot_timeline(out: Path, timeline: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    stages = [s for s in timeline if s != "total"]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(stages) + 1.2))
    ax.barh(stages[::-1], [timeline[s] / 60 for s in stages[::-1]], color="tab:blue")
    ax.set(xlabel="minutes", title=f"Pipeline timeline: {timeline['total'] / 60:.1f} min in all")
    save_figure(fig, out / "timeline.png", dpi=100)


def _grouped(ax, models, domains, value, label):
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [value(m, d) for d in domains], width, label=m)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel(label)


def plot_accuracy(out: Path, acc: dict, domains) -> None:
    plt = pyplot()
    if plt is None or not acc:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, mode in zip(axes, ("thinking", "non_thinking")):
        _grouped(ax, list(acc), domains, lambda m, d: acc[m].get(d, {}).get(mode, 0.0), "held-out accuracy")
        ax.set(title=mode.replace("_", "-"), ylim=(0, 1.05))
    axes[1].legend(fontsize=7, loc="upper right")
    save_figure(fig, out / "accuracy.png", dpi=100)


def plot_lengths(out: Path, details: dict, domains) -> None:
    plt = pyplot()
    if plt is None or not details:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, mode in zip(axes, ("thinking", "non_thinking")):
        _grouped(ax, list(details), domains,
                 lambda m, d: details[m].get(d, {}).get(mode, {}).get("mean_length", 0.0), "mean response tokens")
        ax.set(title=mode.replace("_", "-"))
    axes[1].legend(fontsize=7, loc="upper right")
    save_figure(fig, out / "lengths.png", dpi=100)
