"""The `lookup` tool: BM25 search over a local document collection (Robertson & Zaragoza 2009, k1=1.5, b=0.75).

Documents come from a list of strings, or a directory of .txt/.md files (one document per blank-line-separated
paragraph, titled by the file name) and .jsonl files (one {"text": ..., "title"?: ...} per line).

    index = DocumentIndex(["Paris is the capital of France.", "Berlin is the capital of Germany."])
    index.search("capital of germany", k=1)[0].text   # 'Berlin is the capital of Germany.'
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Document:
    text: str
    title: str = ""


@dataclass
class Hit:
    doc_id: int
    score: float
    title: str
    text: str


def load_documents(source) -> list[Document]:
    """Documents from a list of strings/dicts/Documents, or from a directory (or one file) of .txt/.md/.jsonl."""
    if isinstance(source, (str, Path)) and Path(source).exists():
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl")) if path.is_dir() \
            else [path]
        if not files:
            raise ValueError(f"{path}: no .txt, .md or .jsonl files to index")
        docs = []
        for f in files:
            if f.suffix == ".jsonl":
                docs += _read_jsonl(f)
            else:
                docs += [Document(p.strip(), f.stem) for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8"))
                         if p.strip()]
        return docs
    if isinstance(source, (str, Path)):
        raise ValueError(f"{source}: no such file or directory (pass a list of strings for in-memory documents)")
    docs = []
    for i, item in enumerate(source):
        if isinstance(item, Document):
            docs.append(item)
        elif isinstance(item, str):
            docs.append(Document(item))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            docs.append(Document(item["text"], str(item.get("title", ""))))
        else:
            raise ValueError(f"documents[{i}]: expected a string or {{'text': str, 'title'?: str}}, got {item!r}")
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e}); one object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{n}: expected {{\"text\": str, \"title\"?: str}}, got {line[:80]!r}")
        docs.append(Document(row["text"], str(row.get("title", row.get("id", "")))))
    return docs


class DocumentIndex:
    """An in-memory BM25 index; `search` returns the best `k` documents with a positive score."""

    def __init__(self, documents, *, k1: float = 1.5, b: float = 0.75):
        self.docs = load_documents(documents)
        if not self.docs:
            raise ValueError("DocumentIndex: the collection is empty")
        self.k1, self.b = k1, b
        self.tf = [Counter(words(d.title + " " + d.text)) for d in self.docs]
        self.length = [sum(tf.values()) for tf in self.tf]
        self.avg_length = sum(self.length) / len(self.docs) or 1.0
        df = Counter(w for tf in self.tf for w in tf)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def search(self, query: str, k: int = 3) -> list[Hit]:
        terms = words(query)
        scores = []
        for i, tf in enumerate(self.tf):
            norm = self.k1 * (1 - self.b + self.b * self.length[i] / self.avg_length)
            s = sum(self.idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf)
            if s > 0:
                scores.append((s, i))
        scores.sort(key=lambda x: (-x[0], x[1]))
        return [Hit(i, s, self.docs[i].title, self.docs[i].text) for s, i in scores[:k]]

    def __call__(self, query: str, k: int = 3, max_chars: int = 500) -> str:
        """The tool's text: numbered hits, each cut to `max_chars`."""
        if not isinstance(query, str) or not words(query):
            raise ValueError("lookup: the query has no words to search for")
        hits = self.search(query, k)
        if not hits:
            return "no results"
        return "\n".join(f"[{n}] " + (f"{h.title}: " if h.title else "") +
                         (h.text if len(h.text) <= max_chars else h.text[:max_chars] + "...")
                         for n, h in enumerate(hits, 1))


LOOKUP_SCHEMA = {"type": "function", "function": {
    "name": "lookup",
    "description": "Search the local document collection and return the best matching passages.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "words to search for"},
        "k": {"type": "integer", "description": "how many passages (default 3)", "minimum": 1, "maximum": 10}},
        "required": ["query"], "additionalProperties": False}}}
