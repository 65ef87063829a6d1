"""The DSA recipe end to end, and the evidence that sparse matches dense (`dsv32 dsa-recipe`, `make demo`).

    pretrain (dense LM)  ->  dsa-warmup (stage 1: only the indexer, KL to dense attention)
                         ->  dsa-sparse (stage 2: top-k attention, LM + indexer KL)
                         ->  dense-control (the same start, the same tokens, the same steps, dense attention)

then, on held-out data: indexer recall before and after stage 1 (an untrained indexer recalls about k/L of
the attention mass), validation loss of the sparse model against the dense control, and retrieval accuracy
(passkey, key-value recall) by length for both. Every stage writes OUT/<stage>/ (checkpoints, metrics.jsonl)
and OUT/<stage>/final/ (Hugging Face format); a finished stage is skipped when the recipe runs again and an
interrupted one resumes from its last checkpoint. The result is the `dsa` section of OUT/report.json,
with OUT/report.md and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..eval import indexer_recall, retrieval_accuracy
from ..eval.long_context import copy_accuracy
from ..io import atomic_write, pyplot, save_figure, write_json
from . import stages
from .optim import TrainConfig

STAGE_ORDER = ("induction", "digits", "keys", "pretrain", "dsa-warmup", "dsa-sparse", "dense-control")


@dataclass
class Recipe:
    """Defaults: the `tiny` preset on a 2-core CPU (minutes per stage)."""

    preset: str = "tiny"
    seq_len: int = 256                # 2x the optimizer steps of 512-token rows for the same tokens; top-64 = L/4
    batch_size: int = 8               # rows per step of stage 1, stage 2 and the dense control
    pretrain_batch_size: int = 4      # half the rows of stage 2: twice the optimizer steps for the same tokens
    # Retrieval curriculum: three phases on short rows before pretraining (0 steps skips a phase). A 4M byte-level
    # model grows no retrieval from long rows alone (passkey and key-value 0.00 exact after 1800 pretraining steps).
    # 1. "induction": rows of random strings said twice (corpus.repeat_document): copying forms (~1300 steps).
    # 2. "digits": digit strings copied across filler (corpus.digit_copy_document): copying in order across a gap.
    # 3. "keys": key-value needles with one-token keys (corpus.kv_key_document, 2-3 needles, 1-2 asked) in
    #    `key_share` of the rows, digit copies in the rest: picking the right needle by its key. It forms only
    #    after "digits", not mixed into it (0.00 at 47 tokens after 1200 steps) nor on rows of 256 (500 steps: 0.00).
    # `n_repeat` / `n_digit_copy` keep phases 1-2's documents in the pretraining mix, so copying does not erode
    # (at pretrain_lr 3e-3 it fell from 0.73 to 0 within 300 steps: 1e-3 after the curriculum).
    # kv_key, not kv_recall: the "key#" question of kv_recall needs a two-token match among several "#"s and stays
    # at 0.00 exact; a one-token key is first-order induction, like the passkey's unique "#".
    # Measured with these defaults (one thread of a shared 2-core machine, ~36 min; 24 documents per kind): dense /
    # sparse 0.96 / 0.95 at 160 and 0.97 / 0.98 at 256 (passkey 1.00; kv_key 0.92 / 0.90, 0.94 / 0.96), 0.00 at
    # 512 (beyond the training length); recall 0.50 -> 0.99; held-out loss sparse vs dense -0.06%. Without the keys
    # phase kv_key is 0.00; with 1000 key steps 0.79 / 0.75 at 160.
    induction_steps: int = 1500
    induction_seq_len: int = 32
    induction_batch_size: int = 32
    induction_lr: float = 3e-3
    digit_steps: int = 1200
    digit_seq_len: int = 48
    digit_batch_size: int = 32
    digit_lr: float = 2e-3
    n_digit_copy: int = 2000
    key_steps: int = 2000
    key_seq_len: int = 64
    key_batch_size: int = 32
    key_lr: float = 2e-3
    key_share: float = 0.75
    pretrain_steps: int = 1200
    warmup_steps: int = 150
    sparse_steps: int = 100
    pretrain_lr: float = 1e-3
    warmup_lr: float = 1e-3
    sparse_lr: float = 3e-4
    n_synthetic: int = 6000           # synthetic long-range documents (passkey, key-value): ~1.3 epochs
    n_copy: int = 2000                # copy-episode documents: they grow the induction heads retrieval needs
    n_repeat: int = 3000              # repeated-string documents (64 up to seq_len): keep the induction phase's copying
    synthetic_kinds: tuple = ("passkey", "kv_key")  # the evaluated formats only: fewer formats to learn
    min_synthetic_length: int = 140   # their lengths are spread from here up to seq_len
    answer_weight: float = 4.0        # loss weight of their answer spans
    eval_lengths: tuple = (160, 256, 512)  # 512 is beyond the training length: reported, not required
    eval_n: int = 24                  # documents per kind and length (the key-value kinds ask 2 questions each)
    val_rows: int = 16                # held-out packed rows for the validation loss and recall
    seed: int = 0
    # Model config overrides, e.g. {"indexer.topk": 32}. init_std 0.1 instead of the preset's 0.02: at 0.02 the
    # tiny model shows no induction head after 600 steps of pure copy episodes; at 0.1 it copies after ~150.
    overrides: dict = field(default_factory=lambda: {"init_std": 0.1})

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _train_config(r: Recipe, steps: int, lr: float, out: Path, batch_size: int) -> TrainConfig:
    return TrainConfig(lr=lr, steps=steps, batch_size=batch_size, seq_len=r.seq_len, seed=r.seed,
                       warmup_steps=min(10, steps), log_every=10, ckpt_every=max(steps // 4, 1), out_dir=str(out))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RecipeRun:
    """One run of the recipe in `out`; `stage(name)` trains a stage unless its final model exists."""

    def __init__(self, recipe: Recipe, out, log=print):
        self.r, self.out, self.log = recipe, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        self.timeline: dict[str, float] = {}
        self._train = None

    def dataset(self, name: str = "pretrain"):
        """The training rows (rebuilt identically for every stage, so each stage sees the same stream); the
        "induction" stage has its own short rows of repeated strings."""
        if name == "induction":
            r = self.r
            return stages.build_repeat_dataset(r.induction_seq_len, r.seed, r.induction_steps * r.induction_batch_size,
                                               r.answer_weight)
        if name == "digits":
            r = self.r
            return stages.build_repeat_dataset(r.digit_seq_len, r.seed, r.digit_steps * r.digit_batch_size,
                                               r.answer_weight, kind="digits")
        if name == "keys":
            r = self.r
            return stages.build_repeat_dataset(r.key_seq_len, r.seed + 1, r.key_steps * r.key_batch_size,
                                               r.answer_weight, kind="digits", kv_key_share=r.key_share)
        if self._train is None:
            r = self.r
            self._train = stages.build_dataset(r.seq_len, r.seed, r.n_synthetic,
                                               min_synthetic_length=r.min_synthetic_length,
                                               answer_weight=r.answer_weight, n_copy=r.n_copy,
                                               kinds=r.synthetic_kinds, n_repeat=r.n_repeat,
                                               n_digit_copy=r.n_digit_copy)
        return self._train

    def final(self, name: str) -> Path:
        return self.out / name / "final"

    def stage(self, name: str, stage: str, init_from: Path | None, steps: int, lr: float, track=None):
        """Train `stage` (a `stages.STAGES` name) into OUT/name, starting from `init_from`; return the model.
        `track(model, step)` is called after every optimizer step (evaluation curves)."""
        final = self.final(name)
        if (final / "config.json").is_file():
            self.log(f"[{name}] done before; loading {final}")
            return stages.build_model(init_from=final)
        r = self.r
        model = stages.build_model(r.preset, init_from, None if init_from else r.overrides)
        if init_from is None:
            model.init_weights(r.seed)
        data = self.dataset(name)
        data.epoch, data.cursor = 0, 0  # every stage starts at the same place in the same stream
        t0 = time.time()
        self.log(f"[{name}] {steps} steps of {stage} ({stages.get_stage(stage).help})")
        on_step = None if track is None else (lambda step, logs: track(model, step))
        batch = {"induction": r.induction_batch_size, "digits": r.digit_batch_size, "keys": r.key_batch_size,
                 "pretrain": r.pretrain_batch_size}.get(name, r.batch_size)
        cfg = _train_config(r, steps, lr, self.out / name, batch)
        if name == "induction":  # as measured in the copy probes: 100 warm-up steps, then a constant lr, no decay
            cfg.seq_len, cfg.warmup_steps = r.induction_seq_len, min(100, steps)
            cfg.min_lr_ratio, cfg.weight_decay = 1.0, 0.0
        elif name in ("digits", "keys"):  # as measured (corpus.digit_copy_document): 50 warm-up steps, constant lr
            cfg.seq_len, cfg.warmup_steps = r.digit_seq_len if name == "digits" else r.key_seq_len, min(50, steps)
            cfg.min_lr_ratio, cfg.weight_decay = 1.0, 0.0
        elif name == "pretrain" and init_from is not None:  # a gentle start: fresh Adam moments on a trained model
            cfg.warmup_steps = min(100, steps)
        stages.run(stage, model, stages.Stream(data, batch), cfg, on_step=on_step)
        model.save_pretrained(final)
        self.timeline[name] = time.time() - t0
        self._save_timeline()
        return model

    def _save_timeline(self) -> None:
        path = self.out / "timeline.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        write_json(path, {**old, **self.timeline})


def update_report(out, section: str, value) -> dict:
    """Merge `value` into OUT/report.json under `section` (written atomically); return the whole report."""
    path = Path(out) / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[section] = value
    write_json(path, report)
    return report


# -- evaluation ------------------------------------------------------------------------------------


def validation_rows(r: Recipe) -> dict:
    """Held-out packed rows (natural documents never trained on + synthetic documents from another seed)."""
    val = stages.build_dataset(r.seq_len, r.seed, max(r.n_synthetic // 50, 8), split="val",
                               min_synthetic_length=r.min_synthetic_length, kinds=r.synthetic_kinds)
    n = min(r.val_rows, len(val))
    return val.make_batch(val.input_ids_NL[:n], val.doc_ids_NL[:n])


@torch.no_grad()
def mean_recall(model, val: dict, rows: int = 4, key: str = "recall") -> tuple[float, list[float]]:
    """Mean over layers (and per layer) of the indexer's recall of the dense attention mass; key="ceiling"
    gives the mass inside the dense attention's own top-k instead (the best any indexer could recall)."""
    model.eval()
    per_layer = [x[key] for x in indexer_recall(model, val["input_ids"][:rows], val["doc_ids"][:rows])]
    return sum(per_layer) / len(per_layer), per_layer


@torch.no_grad()
def validation_loss(model, val: dict, mode: str, buckets=(0, 64, 256, 1024, 4096)) -> dict:
    """Mean next-token loss on the held-out rows in attention `mode`, overall and by position bucket."""
    model.eval()
    model.set_attn_mode(mode)
    losses, valid = [], []
    for i in range(0, val["input_ids"].shape[0], 4):
        ids, docs, labels = (val[k][i:i + 4] for k in ("input_ids", "doc_ids", "labels"))
        logits = model(ids, doc_ids=docs).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                               reduction="none").view_as(labels)
        losses.append(ce)
        valid.append(labels != -100)
    ce_NT, ok_NT = torch.cat(losses), torch.cat(valid)
    out = {"loss": (ce_NT * ok_NT).sum().item() / ok_NT.sum().item(), "by_position": {}}
    T = ce_NT.shape[1]
    for lo, hi in zip(buckets, buckets[1:]):
        if lo >= T:
            break
        m = ok_NT[:, lo:hi]
        out["by_position"][f"{lo}-{min(hi, T)}"] = (ce_NT[:, lo:hi] * m).sum().item() / max(m.sum().item(), 1)
    return out


def eval_kinds(r: Recipe) -> tuple:
    """The retrieval kinds evaluated: the trained synthetic kinds that are needle retrieval (not multihop)."""
    kinds = tuple(k for k in dict.fromkeys(r.synthetic_kinds) if k != "multihop")
    if not kinds:
        raise ValueError(f"recipe: synthetic_kinds={r.synthetic_kinds!r} holds no retrieval kind to evaluate; "
                         "add passkey, kv_recall or kv_key")
    return kinds


def run(recipe: Recipe, out, log=print) -> dict:
    """Run (or finish) every stage and the evaluation; returns the `dsa` section of the report."""
    r = recipe
    job = RecipeRun(r, out, log)
    out = job.out
    write_json(out / "recipe.json", asdict(r))
    val = validation_rows(r)

    start, copy = None, {}  # copy: teacher-forced accuracy on repeated strings (is there an induction head?)
    if r.induction_steps:
        first = job.stage("induction", "pretrain", None, r.induction_steps, r.induction_lr)
        start = job.final("induction")
        copy["induction"] = {str(n): copy_accuracy(first, n, seed=r.seed + 5) for n in (r.induction_seq_len, r.seq_len)}
    if r.digit_steps:
        job.stage("digits", "pretrain", start, r.digit_steps, r.digit_lr)
        start = job.final("digits")
    if r.key_steps:
        job.stage("keys", "pretrain", start, r.key_steps, r.key_lr)
        start = job.final("keys")
    base = job.stage("pretrain", "pretrain", start, r.pretrain_steps, r.pretrain_lr)
    copy["pretrain"] = {str(r.seq_len): copy_accuracy(base, r.seq_len, seed=r.seed + 5)}
    log(f"copy accuracy on repeated strings (length: accuracy) {copy}")
    k, L = base.cfg.indexer.topk, max(r.eval_lengths)
    if not k <= L / 4:
        log(f"warning: top-k {k} > L/4 at the longest eval length {L}: sparsity is barely exercised")
    recall_untrained, recall_untrained_layers = mean_recall(base, val)

    recall_curve = []

    def track_recall(model, step: int) -> None:  # held-out recall during stage 1, for the plot
        if step % 20 == 0:
            recall_curve.append({"step": step, "recall": mean_recall(model, val)[0]})
            model.train()

    warm_final = job.final("dsa-warmup")
    warm = job.stage("dsa-warmup", "dsa-warmup", job.final("pretrain"), r.warmup_steps, r.warmup_lr, track_recall)
    curve_file = out / "dsa-warmup" / "recall_curve.json"
    if recall_curve:
        write_json(curve_file, recall_curve)
    elif curve_file.is_file():
        recall_curve = json.loads(curve_file.read_text())
    recall_stage1, recall_stage1_layers = mean_recall(warm, val)
    ceiling, ceiling_layers = mean_recall(warm, val, key="ceiling")
    log(f"[dsa-warmup] held-out recall of the attention mass (top-{k}): untrained {recall_untrained:.3f} -> "
        f"{recall_stage1:.3f}")

    sparse = job.stage("dsa-sparse", "dsa-sparse", warm_final, r.sparse_steps, r.sparse_lr)
    dense = job.stage("dense-control", "pretrain", warm_final, r.sparse_steps, r.sparse_lr)

    t0 = time.time()
    val_sparse = validation_loss(sparse, val, "sparse")
    val_dense = validation_loss(dense, val, "dense")
    recall_final, _ = mean_recall(sparse, val)
    kinds = eval_kinds(r)
    retr_sparse = retrieval_accuracy(sparse, r.eval_lengths, kinds, n=r.eval_n, seed=r.seed + 7, modes=("sparse",))
    retr_dense = retrieval_accuracy(dense, r.eval_lengths, kinds, n=r.eval_n, seed=r.seed + 7, modes=("dense",))
    retrieval = {str(length): {"dense": retr_dense[length]["dense"], "sparse": retr_sparse[length]["sparse"],
                               "kinds": {kind: {"dense": retr_dense[length]["kinds"][kind]["dense"],
                                                "sparse": retr_sparse[length]["kinds"][kind]["sparse"]}
                                         for kind in retr_dense[length]["kinds"]},
                               "tokens": {kind: {"dense": retr_dense[length]["tokens"][kind]["dense"],
                                                 "sparse": retr_sparse[length]["tokens"][kind]["sparse"]}
                                          for kind in retr_dense[length]["tokens"]}}
                 for length in r.eval_lengths}
    job.timeline["evaluation"] = time.time() - t0
    job._save_timeline()
    timeline = json.loads((out / "timeline.json").read_text())

    dsa = {
        "preset": r.preset, "topk": k, "seq_len": r.seq_len, "eval_lengths": list(r.eval_lengths),
        "recall_untrained": recall_untrained, "recall_untrained_layers": recall_untrained_layers,
        "recall_stage1": recall_stage1, "recall_stage1_layers": recall_stage1_layers,
        "recall_ceiling": ceiling, "recall_ceiling_layers": ceiling_layers,
        "recall_after_stage2": recall_final, "recall_curve": recall_curve,
        "val_loss_dense": val_dense["loss"], "val_loss_sparse": val_sparse["loss"],
        "val_loss_rel_diff": (val_sparse["loss"] - val_dense["loss"]) / val_dense["loss"],
        "val_loss_by_position": {"dense": val_dense["by_position"], "sparse": val_sparse["by_position"]},
        "retrieval": retrieval, "copy_accuracy": copy,
        "steps": {"induction": r.induction_steps, "digits": r.digit_steps, "keys": r.key_steps,
                  "pretrain": r.pretrain_steps,
                  "dsa-warmup": r.warmup_steps, "dsa-sparse": r.sparse_steps, "dense-control": r.sparse_steps},
        "seconds": {s: timeline.get(s) for s in STAGE_ORDER + ("evaluation",)},
    }
    dsa["checks"] = checks(dsa)
    update_report(out, "dsa", dsa)
    write_markdown(out, dsa)
    plot(out, dsa)
    log(summary_line(dsa))
    return dsa


def checks(dsa: dict) -> dict:
    """The acceptance checks of the DSA-training issue, evaluated on this run's numbers."""
    L_max, train_len = max(int(x) for x in dsa["retrieval"]), dsa["seq_len"]
    return {
        "recall_stage1_ge_0.90": dsa["recall_stage1"] >= 0.90,
        "val_loss_within_2pct": abs(dsa["val_loss_rel_diff"]) <= 0.02,
        "retrieval_within_2pts": all(abs(v["sparse"] - v["dense"]) <= 0.02 for v in dsa["retrieval"].values()),
        "dense_control_retrieves_ge_0.8": all(v["dense"] >= 0.8 for L, v in dsa["retrieval"].items()
                                              if int(L) <= train_len),
        "topk_le_quarter_of_longest": dsa["topk"] <= L_max / 4,
    }


def summary_line(dsa: dict) -> str:
    retr = ", ".join(f"{L}: {v['dense']:.2f}/{v['sparse']:.2f}" for L, v in dsa["retrieval"].items())
    return (f"DSA (top-{dsa['topk']}, trained at {dsa['seq_len']}): recall {dsa['recall_untrained']:.2f} -> "
            f"{dsa['recall_stage1']:.2f} after stage 1; held-out loss sparse {dsa['val_loss_sparse']:.4f} vs dense "
            f"{dsa['val_loss_dense']:.4f} ({100 * dsa['val_loss_rel_diff']:+.2f}%); retrieval dense/sparse {retr}")


def write_markdown(out: Path, dsa: dict) -> None:
    lines = ["## DSA: sparse against dense", "",
             f"Top-k {dsa['topk']}, trained at {dsa['seq_len']} tokens. Stage 1 trains only the indexer; stage 2 and "
             "the dense control start from the same stage-1 model and see the same tokens for the same steps.", "",
             "| metric | value |", "|---|---|",
             f"| indexer recall, untrained | {dsa['recall_untrained']:.3f} |",
             f"| indexer recall, after stage 1 | {dsa['recall_stage1']:.3f} |",
             f"| recall ceiling (dense attention's own top-k) | {dsa['recall_ceiling']:.3f} |",
             "| per layer after stage 1 (ceiling) | " + ", ".join(
                 f"{r:.2f} ({c:.2f})" for r, c in zip(dsa["recall_stage1_layers"], dsa["recall_ceiling_layers"])) + " |",
             f"| indexer recall, after stage 2 | {dsa['recall_after_stage2']:.3f} |",
             f"| held-out loss, dense control | {dsa['val_loss_dense']:.4f} |",
             f"| held-out loss, sparse | {dsa['val_loss_sparse']:.4f} ({100 * dsa['val_loss_rel_diff']:+.2f}%) |", "",
             "| length | retrieval, dense | retrieval, sparse | answer tokens right, dense / sparse | top-k / length |",
             "|---|---|---|---|---|"]
    for L, v in dsa["retrieval"].items():
        tok = {m: sum(t[m] for t in v["tokens"].values()) / len(v["tokens"]) for m in ("dense", "sparse")}
        lines.append(f"| {L} | {v['dense']:.3f} | {v['sparse']:.3f} | {tok['dense']:.3f} / {tok['sparse']:.3f} | "
                     f"{dsa['topk'] / int(L):.3f} |")
    lines += ["", "| stage | steps | seconds |", "|---|---|---|"]
    for s in STAGE_ORDER:
        sec = dsa["seconds"].get(s)
        lines.append(f"| {s} | {dsa['steps'][s]} | {'' if sec is None else f'{sec:.0f}'} |")
    lines += ["", "Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in dsa["checks"].items()), "",
              "![losses](dsa_loss.png) ![indexer](dsa_indexer.png) ![retrieval](dsa_retrieval.png)", ""]
    atomic_write(out / "report_dsa.md", "\n".join(lines))


def plot(out: Path, dsa: dict) -> None:
    """dsa_loss.png (training loss, sparse vs dense control), dsa_indexer.png (stage-1 KL and recall by
    step), dsa_retrieval.png (retrieval accuracy by length); skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("dense-control", "dense control"), ("dsa-sparse", "sparse (stage 2)")):
        recs = [m for m in _read_metrics(out / name / "metrics.jsonl") if m.get("loss") is not None]
        key = "lm_loss" if name == "dsa-sparse" else "loss"
        ax.plot([m["step"] for m in recs], [m.get(key, m["loss"]) for m in recs], label=label)
    ax.set(xlabel="step", ylabel="training LM loss", title="Stage 2: sparse vs dense on the same tokens")
    ax.legend()
    save_figure(fig, out / "dsa_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    recs = [m for m in _read_metrics(out / "dsa-warmup" / "metrics.jsonl") if m.get("indexer_kl") is not None]
    ax.plot([m["step"] for m in recs], [m["indexer_kl"] for m in recs], color="tab:blue", label="indexer KL")
    ax.set(xlabel="stage-1 step", ylabel="indexer KL")
    ax2 = ax.twinx()
    curve = dsa["recall_curve"]
    ax2.plot([0] + [c["step"] for c in curve], [dsa["recall_untrained"]] + [c["recall"] for c in curve], "o-",
             color="tab:orange", label="held-out recall")
    ax2.set(ylabel="recall of the attention mass", ylim=(0, 1))
    ax.set_title("Stage 1: the indexer learns dense attention")
    save_figure(fig, out / "dsa_indexer.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = list(dsa["retrieval"])
    xs = range(len(lengths))
    ax.bar([x - 0.2 for x in xs], [dsa["retrieval"][L]["dense"] for L in lengths], 0.4, label="dense control")
    ax.bar([x + 0.2 for x in xs], [dsa["retrieval"][L]["sparse"] for L in lengths], 0.4, label=f"sparse top-{dsa['topk']}")
    ax.set_xticks(list(xs), lengths)
    ax.set(xlabel="context length (tokens)", ylabel="retrieval accuracy", ylim=(0, 1.05),
           title="Passkey and key-value retrieval")
    ax.legend()
    save_figure(fig, out / "dsa_retrieval.png")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 dsa-recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/dsa", metavar="DIR")
    p.add_argument("--from", dest="redo", choices=STAGE_ORDER, default=None,
                   help="redo this stage and the ones after it (finished stages are otherwise skipped)")
    for f in fields(Recipe):
        if f.name == "overrides":
            continue
        default = getattr(Recipe(), f.name)
        if isinstance(default, tuple):
            p.add_argument(f"--{f.name.replace('_', '-')}", default=",".join(map(str, default)))
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    args, rest = p.parse_known_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(Recipe) if f.name != "overrides"}
    values["eval_lengths"] = tuple(int(x) for x in str(values["eval_lengths"]).split(","))
    values["synthetic_kinds"] = tuple(x.strip() for x in str(values["synthetic_kinds"]).split(",") if x.strip())
    recipe = Recipe(**values, overrides={**Recipe().overrides, **stages.parse_overrides(rest)})
    if args.redo:
        import shutil

        for s in STAGE_ORDER[STAGE_ORDER.index(args.redo):]:
            shutil.rmtree(Path(args.out) / s, ignore_errors=True)
    run(recipe, args.out)
    return 0
