"""Data: byte tokenizer with DeepSeek-V3.2 specials, corpora (natural + synthetic long-range), packing, loaders."""

from .corpus import (Document, kv_recall_document, multihop_document, natural_documents, pack, passkey_document,
                     synthetic_documents)
from .loaders import PackedDataset, read_jsonl, read_parquet, read_text_files
from .tokenizer import SPECIALS, ByteTokenizer

__all__ = ["ByteTokenizer", "SPECIALS", "Document", "natural_documents", "passkey_document", "kv_recall_document",
           "multihop_document", "synthetic_documents", "pack", "PackedDataset", "read_text_files", "read_jsonl",
           "read_parquet"]
