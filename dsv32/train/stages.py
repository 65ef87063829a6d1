"""The three training stages of DSA (dsa-anchors.md §2.1, small-scale defaults §7.2), each only what differs
from the generic loop (`loop.train`): attention mode, parameter groups, loss.

    pretrain     dense attention, LM loss, every parameter except the indexer (it gets no gradient densely)
    dsa-warmup   stage 1: dense attention, ONLY the indexer trains (lr 1e-3), loss = mean over layers of the
                 indexer KL against dense attention (Eq. 3); the LM head is skipped (`model.hidden`)
    dsa-sparse   stage 2: top-k attention, groups 'main' and 'indexer' clipped apart, loss = LM loss + mean
                 indexer KL over the top-k set (Eq. 4); the model detaches the indexer inputs, so the two
                 gradients are disjoint and the sum trains each part on its own loss only

    from dsv32.train import stages
    summary = stages.run("dsa-warmup", model, stages.Stream(dataset, batch_size), cfg)

`dsv32 pretrain | dsa-warmup | dsa-sparse` (see `main`) builds the model (preset or `--init-from`), the data
(packed natural + synthetic documents, byte tokens), runs the stage and writes `<out>/final/`. The same
command runs data-parallel with FSDP2 under `torchrun --nproc-per-node N -m dsv32 pretrain ...`
(`--batch-size` is the global batch; checkpoints are DCP shards; `final/` is consolidated on rank 0).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..model import Trace
from . import checkpoint
from .loop import cross_entropy, lm_loss, train
from .metrics import Metrics
from .optim import ParamGroup, TrainConfig


def is_indexer(name: str) -> bool:
    return ".indexer." in name


def _mean_kl(trace: Trace) -> torch.Tensor:
    if not trace.indexer_kl:
        raise ValueError("the model produced no indexer KL; every layer must have a lightning indexer")
    return torch.stack(trace.indexer_kl).mean()


def indexer_kl_loss(model, batch: dict):
    """Stage 1: mean over layers of the indexer KL against dense attention; no LM head."""
    trace = Trace(indexer_kl=[])
    model.hidden(batch["input_ids"], doc_ids=batch.get("doc_ids"), trace=trace)
    kl = _mean_kl(trace)
    return kl, {"indexer_kl": kl.item()}


def sparse_loss(model, batch: dict):
    """Stage 2: LM loss + mean indexer KL over the top-k set (their gradients are disjoint)."""
    trace = Trace(indexer_kl=[])
    logits_BTV = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), trace=trace)
    lm = cross_entropy(logits_BTV, batch)
    kl = _mean_kl(trace)
    return lm + kl, {"lm_loss": lm.item(), "indexer_kl": kl.item()}


@dataclass
class Stage:
    name: str
    attn_mode: str
    groups: Callable[[], list[ParamGroup]]
    loss_fn: Callable | None
    lr: float           # default learning rate
    help: str


STAGES = {
    "pretrain": Stage("pretrain", "dense", lambda: [ParamGroup("main", lambda n: not is_indexer(n))], lm_loss, 3e-3,
                      "dense pre-training: LM loss, every parameter except the indexer"),
    "dsa-warmup": Stage("dsa-warmup", "dense", lambda: [ParamGroup("indexer", is_indexer)], indexer_kl_loss, 1e-3,
                        "DSA stage 1: dense attention, only the indexer trains on its KL to dense attention"),
    "dsa-sparse": Stage("dsa-sparse", "sparse",
                        lambda: [ParamGroup("main", lambda n: not is_indexer(n)), ParamGroup("indexer", is_indexer)],
                        sparse_loss, 3e-4,
                        "DSA stage 2: top-k attention, main model on LM loss, indexer on its top-k KL"),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return STAGES[name]


def run(stage: str | Stage, model, batches, cfg: TrainConfig, metrics: Metrics | None = None, resume: bool = True,
        on_step=None) -> dict:
    """Set the stage's attention mode and run the generic loop with its groups and loss."""
    st = get_stage(stage) if isinstance(stage, str) else stage
    model.set_attn_mode(st.attn_mode)
    return train(model, batches, cfg, loss_fn=st.loss_fn, groups=st.groups(), metrics=metrics, resume=resume,
                 on_step=on_step)


# -- data ------------------------------------------------------------------------------------------


class Stream:
    """`PackedDataset.batches` as the resumable iterator the loop wants (__next__, state_dict, load_state_dict)."""

    def __init__(self, dataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self.dataset.batches(self.batch_size)
        return next(self._it)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._it = None  # restart from the restored (epoch, cursor)


VAL_EVERY = 20  # every 20th natural document is held out for validation, never trained on


def build_documents(seq_len: int, seed: int = 0, n_synthetic: int = 64, synthetic_length: int | None = None,
                    max_natural: int | None = None, split: str = "train", min_synthetic_length: int | None = None,
                    n_copy: int = 0, kinds: tuple | None = None, n_repeat: int = 0, n_digit_copy: int = 0):
    """The natural documents of `split` (stdlib docstrings) and synthetic long-range `Document`s.

    Synthetic documents are either all `synthetic_length` long (default: one packed row), or, with
    `min_synthetic_length`, of random lengths up to one row, so needles sit at every distance. The "val"
    split holds out every VAL_EVERY-th natural document and draws its synthetic documents from another seed.
    `n_copy` adds that many copy-episode documents of up to one row (`corpus.copy_document`); `kinds` is the
    cycle of synthetic kinds with `min_synthetic_length` (default `corpus.RETRIEVAL_MIX`). `n_repeat` adds that many
    documents of repeated strings (`corpus.repeat_document`) of 64 tokens up to one row: they keep (and stretch to
    the row length) the copying learnt on short rows of them; `n_digit_copy` likewise adds digit strings copied across
    filler (`corpus.digit_copy_document`) of 64 tokens up to one row.
    """
    from ..data import natural_documents, synthetic_documents
    from ..data.corpus import (MIN_RETRIEVAL_LENGTH, RETRIEVAL_MIX, copy_document, digit_copy_document, repeat_document,
                               retrieval_documents)

    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; choose 'train' or 'val'")
    texts = [t for i, t in enumerate(natural_documents()) if (i % VAL_EVERY == 0) == (split == "val")]
    if max_natural is not None:
        texts = texts[:max_natural]
    synth_seed = seed if split == "train" else seed + 1_000_003
    if n_copy:
        rng = random.Random(synth_seed + 17)
        texts = texts + [copy_document(rng, rng.randint(MIN_RETRIEVAL_LENGTH, max(seq_len - 1, MIN_RETRIEVAL_LENGTH)))
                         for _ in range(n_copy)]
    if n_repeat:
        rng = random.Random(synth_seed + 31)
        texts = texts + [repeat_document(rng, rng.randint(min(64, seq_len - 1), seq_len - 1)) for _ in range(n_repeat)]
    if n_digit_copy:
        rng = random.Random(synth_seed + 37)
        texts = texts + [digit_copy_document(rng, rng.randint(min(64, seq_len - 1), seq_len - 1))
                         for _ in range(n_digit_copy)]
    if not n_synthetic:
        return texts
    # A synthetic document must fit in one packed row (its eos included), or the question and the
    # needle it asks about can land in different rows and the task becomes unlearnable.
    if min_synthetic_length is not None:
        top = synthetic_length or max(seq_len - 1, MIN_RETRIEVAL_LENGTH)
        low = min(max(min_synthetic_length, MIN_RETRIEVAL_LENGTH), top)
        return texts + retrieval_documents(synth_seed, n_synthetic, low, top, tuple(kinds or RETRIEVAL_MIX))
    length = synthetic_length or max(seq_len - 1, 384)  # (fixed-length documents need 384: very short rows cut them)
    return texts + synthetic_documents(synth_seed, n_synthetic, length)


def build_dataset(seq_len: int, seed: int = 0, n_synthetic: int = 64, synthetic_length: int | None = None,
                  max_natural: int | None = None, split: str = "train", min_synthetic_length: int | None = None,
                  answer_weight: float = 1.0, n_copy: int = 0, kinds: tuple | None = None, n_repeat: int = 0,
                  n_digit_copy: int = 0):
    """Packed rows of natural documents mixed with synthetic long-range documents (`build_documents`);
    answer spans weigh `answer_weight` in the LM loss."""
    from ..data import ByteTokenizer, PackedDataset

    docs = build_documents(seq_len, seed, n_synthetic, synthetic_length, max_natural, split, min_synthetic_length,
                           n_copy, kinds, n_repeat, n_digit_copy)
    return PackedDataset.from_documents(docs, ByteTokenizer(), seq_len, seed, answer_weight)


def build_repeat_dataset(seq_len: int, seed: int, n_rows: int, answer_weight: float = 1.0,
                         min_period: int = 4, max_period: int = 12, kind: str = "repeat", kv_key_share: float = 0.0):
    """`n_rows` rows that each hold one `corpus.repeat_document` of exactly `seq_len` tokens (its eos ends the
    row): the curriculum's first phase, short rows where the only thing to learn is copying (an induction head).
    kind="digits": one `corpus.digit_copy_document` of up to `seq_len` tokens per row instead (copying in order
    across a gap), padded; with `kv_key_share` > 0 that share of the rows (at random) holds a
    `corpus.kv_key_document` instead (2-3 one-token keys, 1-2 asked): on short rows the model learns to find a key
    among distractors, which it does not learn on full-length rows (measurements in the `dsa-recipe` Recipe comment)."""
    from ..data import ByteTokenizer, PackedDataset
    from ..data.corpus import digit_copy_document, kv_key_document, repeat_document

    if n_rows < 1:
        raise ValueError(f"build_repeat_dataset: n_rows={n_rows}; pass n_rows >= 1")
    if kind not in ("repeat", "digits"):
        raise ValueError(f"build_repeat_dataset: kind={kind!r}; choose 'repeat' or 'digits'")
    if not 0.0 <= kv_key_share <= 1.0 or (kv_key_share and kind != "digits"):
        raise ValueError(f"build_repeat_dataset: kv_key_share={kv_key_share}; pass a share in [0, 1], "
                         "with kind='digits'")
    if kind == "digits":
        rng = random.Random(seed + 41)
        docs = [digit_copy_document(rng, seq_len - 1) for _ in range(n_rows)]
        if kv_key_share:  # own generators: the digit rows stay those of kv_key_share=0
            pick, kv_rng = random.Random(seed + 43), random.Random(seed + 47)
            if seq_len - 1 < 25:  # 8 characters a needle and a query, and one "\n"
                raise ValueError(f"build_repeat_dataset: seq_len={seq_len} is too short for kv_key rows; pass >= 26")
            for i in range(n_rows):
                if pick.random() < kv_key_share:
                    n = kv_rng.randint(2, 3 if seq_len - 1 >= 33 else 2)
                    q = kv_rng.randint(1, 2 if seq_len - 1 >= 8 * n + 17 else 1)
                    docs[i] = kv_key_document(kv_rng, seq_len - 1, n, q)
        return PackedDataset.from_documents(docs, ByteTokenizer(), seq_len, seed, answer_weight)
    rng = random.Random(seed + 29)
    docs = [repeat_document(rng, seq_len, min_period, max_period) for _ in range(n_rows)]
    return PackedDataset.from_documents(docs, ByteTokenizer(), seq_len, seed, answer_weight)


# -- model -----------------------------------------------------------------------------------------


def resolve_init(path) -> Path:
    """A Hugging Face directory (config.json) as is; a run directory: its newest checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = checkpoint.list_checkpoints(path)
    if found and (found[-1] / "config.json").is_file():
        return found[-1]
    raise ValueError(f"--init-from {path}: neither a Hugging Face checkpoint directory (config.json) nor a run "
                     "directory with step_* checkpoints")


def build_model(preset: str = "tiny", init_from=None, overrides: dict | None = None):
    from .. import presets
    from ..model import Transformer

    overrides = overrides or {}
    if init_from is not None:
        path = resolve_init(init_from)
        if distributed.checkpoint.is_dcp(path):  # a step of a torchrun run: DCP shards + config.json
            return distributed.checkpoint.load_model(path, dtype=torch.float32, **overrides)
        return Transformer.from_pretrained(path, dtype=torch.float32, **overrides)
    cfg = presets.get(preset)
    return Transformer(cfg.replace(**overrides) if overrides else cfg)


# -- command line ----------------------------------------------------------------------------------


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def parse_overrides(rest: list[str]) -> dict:
    """`--model.indexer.topk=32` or `--model.indexer.topk 32` -> {"indexer.topk": 32}."""
    out, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--model."):
            raise ValueError(f"unrecognized argument {arg!r}; model overrides look like --model.indexer.topk=32")
        key, eq, val = arg[len("--model."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ValueError(f"{arg} needs a value, e.g. {arg}=32")
            val, i = rest[i + 1], i + 1
        if not key:
            raise ValueError(f"{arg}: empty model field name")
        out[key] = _value(val)
        i += 1
    return out


def make_parser(stage: Stage) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"dsv32 {stage.name}", description=stage.help,
                                epilog="Model overrides: --model.FIELD=VALUE, e.g. --model.indexer.topk=32")
    p.add_argument("--preset", default="tiny", help="model preset when not --init-from (default tiny)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="a save_pretrained directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", default=f"runs/{stage.name}", metavar="DIR", help="run directory")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=stage.lr)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--synthetic-docs", type=int, default=64, help="synthetic long-range documents in the mix")
    p.add_argument("--synthetic-min-len", type=int, default=None,
                   help="synthetic documents of random lengths from this up to --seq-len (default: all --seq-len)")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="loss weight of the answer spans of synthetic documents (default 1)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (and, under torchrun, FSDP2 bf16 parameters with fp32 gradient reduction)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    return p


def main(stage_name: str, argv: list[str]) -> int:
    """Run one stage from the command line; a user mistake raises ValueError (the CLI prints it, exit 2)."""
    with distributed.session():  # under torchrun: join the process group for this command
        return _main(stage_name, argv)


def _main(stage_name: str, argv: list[str]) -> int:
    stage = get_stage(stage_name)
    parser = make_parser(stage)
    args, rest = parser.parse_known_args(argv)  # a bad typed value exits 2 via argparse with its own message
    overrides = parse_overrides(rest)
    from .. import presets

    if args.init_from is None:
        presets.get(args.preset)  # unknown preset -> ValueError naming it
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.preset, args.init_from, overrides)
    if args.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    dataset = build_dataset(args.seq_len, args.seed, n_synthetic=args.synthetic_docs,
                            min_synthetic_length=args.synthetic_min_len, answer_weight=args.answer_weight)
    if model.cfg.vocab_size < 272:
        raise ValueError(f"the byte tokenizer needs vocab_size >= 272; the model has {model.cfg.vocab_size}")
    cfg = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      warmup_steps=min(args.warmup_steps, args.steps), log_every=args.log_every,
                      ckpt_every=args.ckpt_every, out_dir=args.out, bf16=args.bf16)
    if args.batch_size > len(dataset):
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(dataset)} packed rows")
    ctx = distributed.current()
    if args.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) is not a multiple of the "
                         f"{ctx.world_size} processes; pass a multiple of {ctx.world_size}")
    model = distributed.parallelize(model, ctx, activation_checkpointing=args.activation_checkpointing,
                                    mp_policy=distributed.bf16_policy() if args.bf16 and ctx.enabled else None)
    summary = run(stage, model, Stream(dataset, args.batch_size), cfg, resume=not args.no_resume)
    final = Path(args.out) / "final"
    distributed.export_hf(model, final)  # consolidated on rank 0 when sharded; save_pretrained otherwise
    ctx.print(f"{stage.name}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}; model in {final}")
    return 0
