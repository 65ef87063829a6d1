"""The bench's Markdown tables (measured ratios beside their bounds) and its log-log plot."""

from __future__ import annotations

from pathlib import Path

from ..io import pyplot
from .measure import MAX_REPEATS

PHASE_TITLES = {
    "prefill": "prefill: forward, no grad",
    "train": "train: forward + backward",
    "decode": "decode: one token after L cached, per step",
}


def _index(records: list[dict]) -> dict[tuple, dict]:
    return {(r["phase"], r["length"], r["topk"], r["batch"], r["impl"]): r for r in records}


def _ms(r: dict | None) -> str:
    if r is None:
        return ""
    return f"{r['ms']:.2f}" if not r["skipped"] else "skip"


def _mb(r: dict | None) -> str:
    if r is None or r["skipped"] or r.get("peak_mb") is None:
        return ""
    mb = r["peak_mb"]
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}" if mb >= 0.1 else f"{mb:.2f}"


def _ratio(a: dict | None, b: dict | None, key: str = "ms") -> float | None:
    if a is None or b is None or a["skipped"] or b["skipped"] or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def _x(v: float | None, bold: bool = False) -> str:
    if v is None:
        return ""
    s = f"{v:.2f}×"
    return f"**{s}**" if bold else s


def _shapes_line(meta: dict) -> str:
    s = meta["shapes"]
    return (f"preset `{meta['preset']}`: dim {s['d']}, {s['H']} heads, qk {s['N']}+{s['P']} (rope), v {s['V']}, "
            f"kv_lora_rank R={s['R']}, q_lora_rank {s['q_rank']}; indexer {s['HI']} heads × d_I={s['DI']}"
            f"{', Hadamard' if s['hadamard'] else ''}")


def markdown(records: list[dict], meta: dict) -> str:
    idx = _index(records)
    lines = [
        "# dsv32 bench attention",
        "",
        f"One attention layer, {_shapes_line(meta)}. {meta['dtype']} on {meta['device_name']} "
        f"(torch {meta['torch']}, transformers {meta['transformers']}); DSA kernels: `{meta['kernels']}`.",
        "",
        "- **dense**: the layer in dense mode (prefill/train: MHA mode through SDPA, causal, v padded to the qk "
        "head dim; decode: the absorbed masked path over the latent cache). **dsa**: sparse mode (indexer + "
        "top-k + sparse MLA). **hf**: transformers' `DeepseekV32Attention` (SDPA with the top-k folded into "
        "an L×L mask).",
        f"- Times: median of up to {meta['repeats']} runs"
        + (f" (cases of a few ms: as many as fill ~{meta['min_timed_s']:g} s, at most {MAX_REPEATS})"
           if meta.get("min_timed_s") else "")
        + f" after {meta['warmup']} warm-up run(s), at most {meta['budget_s']:g} s per case, and at least one "
        f"timed run after the first (memory-tracked) one. Peak MB: {meta['peak_memory']} (weights, inputs and "
        "caches excluded; see `static_mb` in attention.json).",
        f"- Bounds (ideal dense/dsa for these shapes; dsv32/bench/costs.py): a pair costs 2·H·(N+P+V) = "
        f"{meta['mha_pair_flops']} FLOPs in MHA mode and 2·H·(2R+P) = {meta['absorbed_pair_flops']} in absorbed "
        f"mode, c = {meta['c']:.2f}. *attn*: attention cores only, ≈ (L/2)/(k·c) for prefill and train; for "
        f"decode the bytes read per step, L·(R+P) latents against L·d_I index keys + k latents. *layer*: all "
        "of the layer's FLOPs (projections, the indexer's L²/2 scores) or bytes (plus weights). "
        "*% of bound* = measured / layer bound. *CPU time*: the ratio of the runs' process CPU time, which "
        "other jobs on a shared machine do not stretch (on a GPU it only counts the host's work).",
        "",
    ]
    for phase in ("prefill", "train", "decode"):
        rows = sorted({(r["length"], r["topk"], r["batch"]) for r in records if r["phase"] == phase},
                      key=lambda t: (t[2], t[0], -t[1]))
        if not rows:
            continue
        kind = next(r["bound_kind"] for r in records if r["phase"] == phase)
        lines += [f"## {PHASE_TITLES[phase]}", "",
                  f"| L | k | B | dense ms | dsa ms | hf ms | dense/dsa | dense/dsa CPU time | bound attn ({kind}) | "
                  "bound layer | % of bound | hf/dsa | dense MB | dsa MB | hf MB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for L, k, B in rows:
            dense, dsa, hf = (idx.get((phase, L, k, B, i)) for i in ("dense", "dsa", "hf"))
            any_r = dense or dsa or hf
            ratio = _ratio(dense, dsa)
            layer = any_r["ratio_bound_layer"]
            pct = f"{100 * ratio / layer:.0f}%" if ratio is not None and layer else ""
            lines.append(f"| {L} | {k} | {B} | {_ms(dense)} | {_ms(dsa)} | {_ms(hf)} | {_x(ratio, True)} | "
                         f"{_x(_ratio(dense, dsa, 'cpu_ms'))} | {_x(any_r['flop_ratio_bound'])} | {_x(layer)} | {pct} | {_x(_ratio(hf, dsa))} | "
                         f"{_mb(dense)} | {_mb(dsa)} | {_mb(hf)} |")
        skipped = [r for r in records if r["phase"] == phase and r["skipped"]]
        if skipped:
            lines += ["", "Skipped:"]
            seen = set()
            for r in skipped:
                key = (r["impl"], r["length"], r["batch"], r["reason"])
                if key in seen:
                    continue
                seen.add(key)
                ks = sorted({x["topk"] for x in skipped if (x["impl"], x["length"], x["batch"], x["reason"]) == key})
                lines.append(f"- {r['impl']} L={r['length']} k={','.join(map(str, ks))} B={r['batch']}: {r['reason']}")
        notes = sorted({f"{r['impl']}: {r['path']}" for r in records if r["phase"] == phase and r.get("path")})
        if notes:
            lines += ["", "Paths: " + "; ".join(notes) + "."]
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], meta: dict, path: Path) -> Path | None:
    """Time against length, log-log, one panel per phase (and decode batch); dense/dsa ratios marked.
    Returns None (and writes nothing) when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    panels = sorted({(r["phase"], r["batch"]) for r in records},
                    key=lambda t: (("prefill", "train", "decode").index(t[0]), t[1]))
    if not panels:
        return None
    topks = sorted({r["topk"] for r in records}, reverse=True)
    colors = {k: f"C{i}" for i, k in enumerate(topks)}
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ncols = min(len(panels), 2)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    idx = _index(records)
    for ax, (phase, B) in zip(axes.flat, panels):
        rs = [r for r in records if r["phase"] == phase and r["batch"] == B and not r["skipped"]]
        dense = sorted({(r["length"], r["ms"]) for r in rs if r["impl"] == "dense"})
        if dense:
            ax.plot(*zip(*dense), "o-", color="black", label="dense (MLA, SDPA)" if phase != "decode"
                    else "dense (MLA, absorbed)")
        for k in topks:
            pts = sorted((r["length"], r["ms"]) for r in rs if r["impl"] == "dsa" and r["topk"] == k)
            if pts:
                ax.plot(*zip(*pts), "s-", color=colors[k], label=f"dsa k={k}")
                for L, ms in pts:
                    ratio = _ratio(idx.get((phase, L, k, B, "dense")), idx.get((phase, L, k, B, "dsa")))
                    if ratio is not None:
                        ax.annotate(f"{ratio:.2f}×", (L, ms), textcoords="offset points", xytext=(4, -11),
                                    fontsize=7, color=colors[k])
            pts = sorted((r["length"], r["ms"]) for r in rs if r["impl"] == "hf" and r["topk"] == k)
            if pts:
                ax.plot(*zip(*pts), "^--", color=colors[k], alpha=0.6, label=f"transformers k={k}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.margins(x=0.12)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel("ms" + (" per step" if phase == "decode" else ""))
        ax.set_title(f"{phase} (batch {B})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"dsv32 attention layer, preset {meta['preset']}, {meta['dtype']}, {meta['device_name']} "
                 f"(labels: dense/dsa time ratio)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
