"""Long-context evaluation: exact-match retrieval accuracy on synthetic documents, and the LM loss on the
end of long rows, each in dense and in sparse (DSA top-k) attention (dsa-anchors.md §7.5: retrieval is what
separates a working sparse indexer from a broken one while the LM loss barely moves).

Scoring is teacher-forced: one forward of the whole document; an answer span [s, e) is correct iff the
argmax of the logits at positions s-1 .. e-2 equals the tokens s .. e-1 (every digit/letter of the answer,
given the true earlier ones). Tokens are ByteTokenizer bytes, so character offsets are token offsets.

    acc = retrieval_accuracy(model, [512, 1024], n=8)
    acc[512]["dense"], acc[512]["sparse"], acc[512]["kinds"]["passkey"]["sparse"]

`score_documents` takes any `logits_fn(ids_BT, doc_ids_BT) -> logits_BTV`, so the scorer itself can be
checked against oracles (tests/test_long_context.py).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..data.corpus import (Document, kv_key_document, kv_recall_document, multihop_document, passkey_document,
                           repeat_document)
from ..data.tokenizer import ByteTokenizer

MODES = ("dense", "sparse")
KINDS = ("passkey", "kv_recall", "kv_key", "multihop")


def passkey_at_depth(rng: random.Random, length: int, depth: float) -> Document:
    """`corpus.passkey_document` with the needle placed at a chosen relative depth in [0, 1] of the filler."""
    return passkey_document(rng, length, depth)


def make_documents(kind: str, length: int, n: int, rng: random.Random, depths=(0.1, 0.5, 0.9),
                   kv_pairs: int = 4, kv_queries: int = 2) -> list[Document]:
    """n documents of `kind` and `length` characters; passkey depths cycle through `depths`."""
    if kind == "passkey":
        return [passkey_at_depth(rng, length, depths[i % len(depths)]) for i in range(n)]
    if kind == "kv_recall":
        return [kv_recall_document(rng, length, kv_pairs, kv_queries) for _ in range(n)]
    if kind == "kv_key":
        return [kv_key_document(rng, length, kv_pairs, kv_queries) for _ in range(n)]
    if kind == "multihop":
        return [multihop_document(rng, length) for _ in range(n)]
    raise ValueError(f"long_context.py: unknown document kind {kind!r}; known: {', '.join(KINDS)}")


@torch.no_grad()
def score_documents(logits_fn: Callable, docs: list[Document], *, batch_size: int = 8, device=None,
                    tokenizer: ByteTokenizer | None = None) -> list[list[bool]]:
    """For every document, one bool per answer span: exact teacher-forced greedy match.

    Documents with the same token count are batched (batch_size rows per forward); no padding is needed.
    """
    return [[all(span) for span in doc] for doc in score_tokens(logits_fn, docs, batch_size=batch_size, device=device,
                                                               tokenizer=tokenizer)]


@torch.no_grad()
def score_tokens(logits_fn: Callable, docs: list[Document], *, batch_size: int = 8, device=None,
                 tokenizer: ByteTokenizer | None = None) -> list[list[list[bool]]]:
    """For every document and answer span, one bool per answer token (teacher-forced argmax right): the partial
    credit behind `score_documents`, which shows a model learning to retrieve before any whole answer is right."""
    tok = tokenizer or ByteTokenizer()
    encoded = [tok.encode(d.text) for d in docs]
    for d, ids in zip(docs, encoded):
        if len(ids) != len(d.text):
            raise ValueError("long_context.py score_documents: document text is not ASCII; character spans "
                             "would not equal token spans")
        if any(s < 1 or e <= s or e > len(ids) for s, e in d.answers):
            raise ValueError(f"long_context.py score_documents: answer spans {d.answers} must satisfy "
                             f"1 <= start < end <= {len(ids)}")
    out: list[list[list[bool]] | None] = [None] * len(docs)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for T, idx in by_len.items():
        for b in range(0, len(idx), batch_size):
            chunk = idx[b:b + batch_size]
            ids_BT = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            pred_BT = logits_fn(ids_BT, None).argmax(-1)  # pred[t] is the guess for token t + 1
            for row, i in enumerate(chunk):
                out[i] = [(pred_BT[row, s - 1:e - 1] == ids_BT[row, s:e]).tolist() for s, e in docs[i].answers]
    return out  # type: ignore[return-value]


def _device(model):
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


@contextmanager
def _eval_state(model):
    """eval() for the duration; the attention mode and training flag are restored afterwards."""
    mode, training = model.cfg.attn_mode, model.training
    model.eval()
    try:
        yield
    finally:
        model.set_attn_mode(mode)
        model.train(training)


def _model_fn(model):
    return lambda ids, doc_ids: model(ids, doc_ids=doc_ids)


def retrieval_accuracy(model, lengths: Iterable[int], kinds=("passkey", "kv_recall"), n: int = 8, seed: int = 0,
                       depths=(0.1, 0.5, 0.9), modes=MODES, batch_size: int = 8, kv_pairs: int = 4,
                       kv_queries: int = 2) -> dict:
    """{L: {"dense": acc, "sparse": acc, "kinds": {kind: {"dense": acc, "sparse": acc}}, "answers": {kind: k},
    "tokens": {kind: {"dense": t, "sparse": t}}}}.

    Per kind, acc is the share of answer spans matched exactly (kv_recall has kv_queries per document);
    the overall acc at L is the mean of the per-kind accuracies; t is the share of answer tokens right (partial
    credit: a 5-digit key with 4 right digits counts 0 in acc and 0.8 in t). The same documents are used in every mode
    (reproducible from `seed`); the model's attention mode is restored afterwards.
    """
    lengths = [int(L) for L in lengths]
    if not lengths or n < 1 or not kinds:
        raise ValueError(f"long_context.py retrieval_accuracy: need lengths, kinds and n >= 1 "
                         f"(got lengths={lengths}, kinds={kinds}, n={n})")
    too_long = [L for L in lengths if L > model.cfg.max_seq_len]
    if too_long:
        raise ValueError(f"long_context.py retrieval_accuracy: lengths {too_long} exceed the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"long_context.py retrieval_accuracy: unknown mode {m!r}; known: {', '.join(MODES)}")
    rng = random.Random(seed)
    docs = {(L, k): make_documents(k, L, n, rng, depths, kv_pairs, kv_queries) for L in lengths for k in kinds}
    device = _device(model)
    result: dict = {L: {"kinds": {k: {} for k in kinds}, "tokens": {k: {} for k in kinds},
                        "answers": {k: sum(len(d.answers) for d in docs[L, k]) for k in kinds}} for L in lengths}
    with _eval_state(model):
        for mode in modes:
            model.set_attn_mode(mode)
            for L in lengths:
                for k in kinds:
                    spans = [span for doc in score_tokens(_model_fn(model), docs[L, k], batch_size=batch_size,
                                                          device=device) for span in doc]
                    result[L]["kinds"][k][mode] = sum(map(all, spans)) / len(spans)
                    result[L]["tokens"][k][mode] = sum(map(sum, spans)) / sum(map(len, spans))
                result[L][mode] = sum(result[L]["kinds"][k][mode] for k in kinds) / len(kinds)
    return result


@torch.no_grad()
def copy_hits(logits_fn: Callable, docs: list[Document]) -> list[bool]:
    """One bool per answer token of equal-length documents: is the teacher-forced argmax that token?"""
    ids_BT = torch.tensor([list(d.text.encode()) for d in docs], dtype=torch.long)
    pred_BT = logits_fn(ids_BT, None).argmax(-1).cpu()  # pred[t] is the guess for token t + 1
    return [bool(pred_BT[i, t - 1] == ids_BT[i, t]) for i, d in enumerate(docs) for a, b in d.answers for t in range(a, b)]


def copy_accuracy(model, length: int, n: int = 32, seed: int = 0, mode: str = "dense") -> float:
    """Share of the answer tokens of `n` `corpus.repeat_document`s of `length` tokens that the model predicts
    (teacher-forced argmax): near 1 once an induction head copies, about 1/period for a model that only
    guesses among the characters seen so far."""
    if n < 1 or mode not in MODES:
        raise ValueError(f"long_context.py copy_accuracy: need n >= 1 and mode in {MODES} (got n={n}, mode={mode!r})")
    rng = random.Random(seed)
    docs = [repeat_document(rng, length) for _ in range(n)]
    device = _device(model)
    with _eval_state(model):
        model.set_attn_mode(mode)
        hits = copy_hits(lambda ids, doc_ids: model(ids.to(device)), docs)
    return sum(hits) / len(hits)


def token_losses(logits_fn: Callable, ids_BT: torch.Tensor, doc_ids_BT: torch.Tensor | None = None):
    """Per-position next-token loss [B, T-1] and the mask of valid targets (same document, not padding)."""
    logits = logits_fn(ids_BT, doc_ids_BT)[:, :-1].float()
    tgt = ids_BT[:, 1:]
    loss_BT = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    if doc_ids_BT is None:
        valid_BT = torch.ones_like(tgt, dtype=torch.bool)
    else:
        valid_BT = (doc_ids_BT[:, 1:] == doc_ids_BT[:, :-1]) & (doc_ids_BT[:, 1:] >= 0)
    return loss_BT, valid_BT


@torch.no_grad()
def trailing_loss(model, ids: torch.Tensor, doc_ids: torch.Tensor | None = None, last: int = 128,
                  modes=MODES) -> dict:
    """{mode: {"last": mean loss of the last `last` target positions of each row, "all": mean over all,
    "last_tokens": count, "all_tokens": count}}; targets that cross a document boundary or are padding are
    excluded. A trailing loss that rises in sparse mode but not in dense mode points at the indexer."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"long_context.py trailing_loss: ids must be [B, T] with T >= 2, got {tuple(ids.shape)}")
    if last < 1:
        raise ValueError(f"long_context.py trailing_loss: last={last}; pass last >= 1")
    device = _device(model)
    ids = ids.to(device)
    doc_ids = None if doc_ids is None else doc_ids.to(device)
    out = {}
    with _eval_state(model):
        for mode in modes:
            model.set_attn_mode(mode)
            loss_BT, valid_BT = token_losses(_model_fn(model), ids, doc_ids)
            tail = torch.zeros_like(valid_BT)
            tail[:, -last:] = True
            tail &= valid_BT
            n_all, n_tail = int(valid_BT.sum()), int(tail.sum())
            out[mode] = {"last": (loss_BT[tail].sum() / max(n_tail, 1)).item() if n_tail else float("nan"),
                         "all": (loss_BT[valid_BT].sum() / max(n_all, 1)).item() if n_all else float("nan"),
                         "last_tokens": n_tail, "all_tokens": n_all}
    return out


def format_table(result: dict, modes=MODES) -> str:
    """A length x mode accuracy table, per-kind columns after the overall ones."""
    Ls = sorted(result)
    kinds = list(result[Ls[0]]["kinds"]) if Ls else []
    head = [f"{'length':>8}"] + [f"{m:>8}" for m in modes] + [f"{k[:10] + '/' + m[0]:>13}" for k in kinds for m in modes]
    lines = [" ".join(head)]
    for L in Ls:
        r = result[L]
        row = [f"{L:>8}"] + [f"{r[m]:>8.3f}" for m in modes]
        row += [f"{r['kinds'][k][m]:>13.3f}" for k in kinds for m in modes]
        lines.append(" ".join(row))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`dsv32 eval long-context --model DIR --lengths 512,1024 [--n 8] [--out FILE.json]`."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="dsv32 eval long-context",
                                description="passkey / kv-recall retrieval accuracy, dense vs sparse attention")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or run directory")
    p.add_argument("--lengths", default="512,1024", help="comma-separated document lengths in tokens")
    p.add_argument("--n", type=int, default=8, help="documents per kind and length")
    p.add_argument("--kinds", default="passkey,kv_recall", help=f"comma-separated, from {','.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers, e.g. 512,1024") from None
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"--kinds: unknown kind {k!r}; known: {', '.join(KINDS)}")
    path = Path(args.model)
    if not path.is_dir():
        raise ValueError(f"--model {args.model}: no such directory")
    from ..train.stages import build_model

    model = build_model(init_from=path).to(args.device)
    result = retrieval_accuracy(model, lengths, kinds=kinds, n=args.n, seed=args.seed, batch_size=args.batch_size)
    print(format_table(result))
    if args.out:
        from ..io import atomic_write

        out = atomic_write(args.out, json.dumps({"model": str(path), "n": args.n, "seed": args.seed,
                                                 "results": {str(L): r for L, r in result.items()}}, indent=2))
        print(f"wrote {out}")
    return 0
