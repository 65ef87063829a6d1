"""The RL section of a run report: `report.json` (merged, written atomically), a Markdown table and PNG curves.

    write("runs/rl-math/report.json", summary, metrics_file="runs/rl-math/metrics.jsonl")

report.json gets `rl.<run name> = {before, after, steps, seconds, ...}` (held-out accuracy, fractions 0–1)
and, for the guard demo, `rl.guard_demo = {fired, rollbacks, before, after}`; other sections of an existing
report.json (the pipeline's) are kept. Beside it: `rl_<name>.png` (reward, held-out accuracy, KL, entropy,
length per step) and `rl.md` with one row per RL run (the pipeline builds its own report.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write, pyplot, save_figure, write_json

CURVES = (("reward/mean", "train reward"), ("eval/mean", "held-out accuracy (guard)"),
          ("train/success", "train success"), ("entropy", "entropy"), ("kl", "KL to reference"),
          ("completions/mean_length", "mean completion length"))


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue   # a line cut by a crash mid-write
    return rows


def plot(rows: list[dict], out_png: Path, title: str) -> Path | None:
    """Curves of the CURVES metrics that the run logged; None (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    present = [(k, label) for k, label in CURVES if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for r in rows:
        if r.get("safeguard/rollbacks") and any(r.get(f"safeguard/alarm/{a}") for a in
                                                ("nonfinite", "entropy_floor", "kl_spike", "length", "eval_drop",
                                                 "hacking")):
            for ax in axes[0]:
                ax.axvline(r["step"], color="red", alpha=0.4, lw=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png, dpi=100)


def write(report_path, summary: dict, metrics_file=None, guard_demo: bool = False) -> dict:
    """Merge one RL run's summary into report.json (+ report.md, + PNG curves); returns the whole report."""
    report_path = Path(report_path)
    report = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{report_path}: existing report is not valid JSON ({e}); move it away or pass "
                             "--report with another path") from None
    name = summary["name"]
    rl = report.setdefault("rl", {})
    entry = {k: summary[k] for k in ("before", "after", "steps", "seconds", "stopped", "ema", "after_last_policy")
             if k in summary}
    for key in ("before_detail", "after_detail"):
        if key in summary:
            detail = summary[key]
            entry[key.replace("_detail", "_domains")] = {d: r["accuracy"] for d, r in detail["domains"].items()}
            if len(detail.get("modes", {})) > 1:
                entry[key.replace("_detail", "_modes")] = {m: {d: r["accuracy"] for d, r in per.items()}
                                                           for m, per in detail["modes"].items()}
    if "guard" in summary:
        entry["guard"] = summary["guard"]
    rows = read_metrics(metrics_file) if metrics_file else []
    png = plot(rows, report_path.parent / f"rl_{name}.png", f"dsv32 rl {name}") if rows else None
    if png is not None:
        entry["curves"] = png.name
    rl[name] = entry
    if guard_demo and "guard" in summary:
        g = summary["guard"]
        rl["guard_demo"] = {"run": name, "fired": g["fired"], "rollbacks": g["rollbacks"], "alarms": g["alarms"],
                            "before": summary["before"], "after": summary["after"]}
    write_json(report_path, report)
    atomic_write(report_path.parent / "rl.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    """The RL table (`rl.md`)."""
    rl = report.get("rl", {})
    lines = ["# RL", "", "| run | held-out before | after | change | steps | minutes | guard |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rl.items():
        if name == "guard_demo" or not isinstance(r, dict) or "before" not in r:
            continue
        g = r.get("guard")
        guard = f"fired {g['fired']}, {g['rollbacks']} rollbacks" if g else "off"
        lines.append(f"| {name} | {r['before']:.3f} | {r['after']:.3f} | {100 * (r['after'] - r['before']):+.1f} pts | "
                     f"{r.get('steps', '')} | {r.get('seconds', 0) / 60:.1f} | {guard} |")
    if "guard_demo" in rl:
        d = rl["guard_demo"]
        lines += ["", f"Guard demo ({d['run']}, hackable reward): fired {d['fired']} times "
                      f"({', '.join(f'{k} {v}' for k, v in d.get('alarms', {}).items() if v)}), "
                      f"{d['rollbacks']} rollbacks; held-out accuracy {d['before']:.3f} -> {d['after']:.3f}."]
    lines += [""] + [f"![{n}]({r['curves']})" for n, r in rl.items() if isinstance(r, dict) and r.get("curves")]
    return "\n".join(lines) + "\n"
