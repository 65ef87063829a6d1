"""Reading text from disk, and `PackedDataset`: packed rows served as shuffled, resumable batches.

    ds = PackedDataset.from_texts(read_jsonl("data.jsonl"), ByteTokenizer(), seq_len=256, seed=0)
    it = ds.batches(8)          # endless; a new seeded shuffle every epoch
    batch = next(it)            # {"input_ids": [B,T], "labels": [B,T], "doc_ids": [B,T]}
    state = ds.state_dict()     # save with the checkpoint; ds.load_state_dict(state) resumes at the next batch

Legend: N rows, L = T + 1 tokens per row, B batch size, T sequence length.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..io import iter_jsonl
from .corpus import pack
from .tokenizer import ByteTokenizer

IGNORE = -100  # F.cross_entropy's default ignore_index


def read_text_files(paths) -> list[str]:
    """One document per file, read as UTF-8."""
    docs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ValueError(f"loaders.py read_text_files: {p} is not a file; pass paths of existing text files")
        docs.append(p.read_text(encoding="utf-8", errors="replace"))
    return docs


def read_jsonl(path, field: str = "text") -> list[str]:
    """The string `field` of every JSON object line; blank lines are skipped."""
    docs = []
    for where, row in iter_jsonl(path, (field,), example=f'{{"{field}": "..."}} (or pass field=<key>)'):
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} is {type(row[field]).__name__}, not a string")
        docs.append(row[field])
    return docs


def read_parquet(path, column: str = "text") -> list[str]:
    """The string column `column` of a Parquet file (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"loaders.py read_parquet({path}): pyarrow is not installed; "
                         "`pip install pyarrow`, or convert the file to JSONL and use read_jsonl") from None
    table = pq.read_table(path)
    if column not in table.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {table.column_names}); pass column=<name>")
    return [str(x) for x in table.column(column).to_pylist() if x is not None]


class PackedDataset:
    """Packed rows (input_ids_NL, doc_ids_NL from `corpus.pack`) served in a seeded order per epoch.

    The order of epoch e is a permutation drawn from seed + e, so (epoch, cursor, seed) pins down the
    next batch exactly. An epoch's last partial batch is dropped.
    """

    def __init__(self, input_ids_NL: torch.Tensor, doc_ids_NL: torch.Tensor, seed: int = 0,
                 weights_NL: torch.Tensor | None = None):
        if input_ids_NL.shape != doc_ids_NL.shape or input_ids_NL.dim() != 2 or input_ids_NL.shape[1] < 2:
            raise ValueError(f"loaders.py PackedDataset: input_ids {tuple(input_ids_NL.shape)} and doc_ids "
                             f"{tuple(doc_ids_NL.shape)} must both be [N, seq_len + 1] with seq_len >= 1")
        if weights_NL is not None and weights_NL.shape != input_ids_NL.shape:
            raise ValueError(f"loaders.py PackedDataset: weights {tuple(weights_NL.shape)} must match input_ids "
                             f"{tuple(input_ids_NL.shape)}")
        self.input_ids_NL, self.doc_ids_NL = input_ids_NL.long(), doc_ids_NL.long()
        self.weights_NL = None if weights_NL is None else weights_NL.float()
        self.seed, self.epoch, self.cursor = seed, 0, 0

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: ByteTokenizer, seq_len: int, seed: int = 0):
        tokens = [tokenizer.encode(t) for t in texts]
        ids, docs = pack(tokens, seq_len, random.Random(seed), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        return cls(ids, docs, seed)

    @classmethod
    def from_documents(cls, docs: list, tokenizer: ByteTokenizer, seq_len: int, seed: int = 0,
                       answer_weight: float = 1.0):
        """Texts and synthetic `Document`s packed together; the answer spans of the Documents weigh
        `answer_weight` in the loss (batches then carry "loss_weights"). A Document that fits one row is
        never cut by a row boundary (`corpus.pack` whole=); texts fill the gaps."""
        from .corpus import Document, answer_weights

        tokens = [tokenizer.encode(d.text if isinstance(d, Document) else d) for d in docs]
        weights = [answer_weights(d, len(t), answer_weight) if isinstance(d, Document) else [1.0] * len(t)
                   for d, t in zip(docs, tokens)]
        ids, doc_ids, w = pack(tokens, seq_len, random.Random(seed), eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, weights=weights,
                               whole=[isinstance(d, Document) for d in docs])  # no question cut from its needle
        return cls(ids, doc_ids, seed, w if answer_weight != 1.0 else None)

    def __len__(self) -> int:
        return self.input_ids_NL.shape[0]

    @staticmethod
    def make_batch(ids_BL: torch.Tensor, docs_BL: torch.Tensor, weights_BL: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """Inputs are tokens 0..T-1, labels tokens 1..T; a label is ignored where the target is padding or
        belongs to another document than its input (no predicting the next document from this one).
        With weights, "loss_weights" [B, T] is the weight of each label (the target token's weight)."""
        labels_BT = ids_BL[:, 1:].clone()
        cross_BT = (docs_BL[:, 1:] != docs_BL[:, :-1]) | (docs_BL[:, 1:] < 0)
        labels_BT[cross_BT] = IGNORE
        batch = {"input_ids": ids_BL[:, :-1], "labels": labels_BT, "doc_ids": docs_BL[:, :-1]}
        if weights_BL is not None:
            batch["loss_weights"] = weights_BL[:, 1:].masked_fill(cross_BT, 0.0)
        return batch

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + epoch))

    def batches(self, batch_size: int, epochs: int | None = None):
        """Batches from the current (epoch, cursor) on; endless unless `epochs` caps the epoch counter."""
        if not 1 <= batch_size <= len(self):
            raise ValueError(f"loaders.py PackedDataset.batches: batch_size={batch_size} but the dataset has "
                             f"{len(self)} rows; pass 1 <= batch_size <= {len(self)} or add data")
        while epochs is None or self.epoch < epochs:
            order = self._order(self.epoch)
            while self.cursor + batch_size <= len(self):
                idx = order[self.cursor:self.cursor + batch_size]
                self.cursor += batch_size  # advanced before yielding: a state saved now points at the next batch
                yield self.make_batch(self.input_ids_NL[idx], self.doc_ids_NL[idx],
                                      None if self.weights_NL is None else self.weights_NL[idx])
            self.epoch, self.cursor = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rows": len(self)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "cursor", "seed"} - set(state)
        if missing:
            raise ValueError(f"loaders.py load_state_dict: state lacks {sorted(missing)}; "
                             "pass what state_dict() returned")
        if state.get("rows", len(self)) != len(self):
            raise ValueError(f"loaders.py load_state_dict: state was saved for {state['rows']} rows, this dataset has "
                             f"{len(self)}; rebuild the dataset from the same data, seq_len and seed")
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
