"""Documents to train and evaluate on, and packing them into fixed-length rows.

Natural text: standard-library docstrings, one document each (no download). Synthetic long-range
documents (passkey, key-value recall, multi-hop references): retrieval accuracy over long contexts is
what separates a working sparse indexer from a broken one while LM loss barely moves
(research/dsa-anchors.md §7.5 and the RULER multikey regressions of §1.4). Every synthetic generator
takes a `random.Random` and returns a `Document` whose `answers` are character spans `[start, end)` of
`text`; the synthetic texts are ASCII, so character offsets equal byte (= ByteTokenizer token) offsets.

Legend: N rows, L = seq_len + 1 tokens per row (inputs and shifted targets come from the same row).
"""

from __future__ import annotations

import bisect
import importlib
import inspect
import random
from dataclasses import dataclass, field

import torch

from .tokenizer import EOS_ID, PAD_ID

DOC_MODULES = ("os", "json", "collections", "functools", "itertools", "pathlib", "re", "random", "string",
               "textwrap", "argparse", "dataclasses", "subprocess", "threading", "math", "statistics",
               "enum", "heapq", "bisect", "datetime", "csv", "logging", "shutil", "inspect")

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A river runs through the valley. The wind moves the leaves. Nothing happens for a while. ")


@dataclass
class Document:
    text: str
    answers: list[tuple[int, int]] = field(default_factory=list)  # [start, end) character spans of the answers
    kind: str = "natural"

    def answer_texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.answers]


def natural_documents(modules=DOC_MODULES, min_chars: int = 40) -> list[str]:
    """Docstrings of the modules and their public members, one document each, in a fixed order."""
    docs, seen = [], set()
    for name in modules:
        mod = importlib.import_module(name)
        # Submodules are skipped: whether `json.decoder` is an attribute of `json` depends on what the
        # process imported before, and the corpus must not.
        members = [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in [mod] + [m for m in members if not inspect.ismodule(m)]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc.strip()) >= min_chars and doc.strip() not in seen:
                seen.add(doc.strip())
                docs.append(doc.strip())
    return docs


def filler(rng: random.Random, n: int) -> str:
    """n characters of bland text starting at a random sentence offset."""
    if n <= 0:
        return ""
    start = rng.randrange(len(FILLER))
    reps = (start + n) // len(FILLER) + 1
    return (FILLER * reps)[start:start + n]


def _names(rng: random.Random, n: int, k: int = 6) -> list[str]:
    """n distinct random lowercase names of k letters."""
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))] = None
    return list(out)


def _too_short(fn: str, length: int, need: int):
    raise ValueError(f"corpus.py {fn}: length={length} is too short for the needle and question "
                     f"({need} characters); pass length >= {need}")


ANSWER_MARK = "#"  # the byte right before every retrieval answer; it never occurs in FILLER


def passkey_document(rng: random.Random, length: int, depth: float | None = None) -> Document:
    """A 5-digit pass key hidden in `length` characters of filler (at relative `depth` in [0, 1] of the filler,
    random when None); question and answer last.

    The format of Mohtashami & Jaggi, with the question ending in the needle's own words: the needle says "The pass
    key is #73519." and the document ends "What is the pass key? The pass key is #73519.", so the answer follows the
    same bytes in both places and copying what followed the earlier "#" answers it (an induction head), where the
    older " ... is 73519" asked the model to match a prefix whose last bytes ("is ") run all through the filler.
    ANSWER_MARK occurs nowhere else in the document."""
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"corpus.py passkey_document: depth={depth}; pass a value in [0, 1] or None")
    key = str(rng.randrange(10000, 100000))
    needle = f" The pass key is {ANSWER_MARK}{key}. Remember it. "
    question = f" What is the pass key? The pass key is {ANSWER_MARK}"
    body = length - len(needle) - len(question) - len(key) - 1
    if body < 0:
        _too_short("passkey_document", length, length - body)
    at = rng.randrange(body + 1) if depth is None else round(depth * body)
    text = filler(rng, at) + needle + filler(rng, body - at) + question
    return Document(text + key + ".", [(len(text), len(text) + len(key))], "passkey")


def _spread(rng: random.Random, pieces: list[str], body: int) -> str:
    """`pieces` in order, separated by `body` characters of filler cut into len(pieces) + 1 random gaps (so the
    pieces sit at spread-out depths)."""
    cuts = sorted(rng.randrange(body + 1) for _ in pieces)
    gaps = [b - a for a, b in zip([0] + cuts, cuts + [body])]
    text = filler(rng, gaps[0])
    for piece, gap in zip(pieces, gaps[1:]):
        text += piece + filler(rng, gap)
    return text


def kv_recall_document(rng: random.Random, length: int, n_pairs: int, n_queries: int = 4) -> Document:
    """`n_pairs` "key#value" lines spread through filler, then `n_queries` lines "key#" asking for the values of
    earlier keys, each answered by its value and ".".

    The query restates the needle's own form ("key#"), so the answer is what followed the same bytes earlier (an
    induction head matching the key), where the older "What is the value of key? " asked for a different separator
    than the needle's "key: "."""
    if n_pairs < 1 or n_queries < 1:
        raise ValueError(f"corpus.py kv_recall_document: n_pairs={n_pairs}, n_queries={n_queries}; both must be >= 1")
    keys = _names(rng, n_pairs)
    values = [str(rng.randrange(100000, 1000000)) for _ in keys]
    asked = [rng.randrange(n_pairs) for _ in range(n_queries)]
    lines = [f"\n{k}{ANSWER_MARK}{v}\n" for k, v in zip(keys, values)]
    queries = [(f"\n{keys[i]}{ANSWER_MARK}", values[i]) for i in asked]
    fixed = sum(map(len, lines)) + sum(len(q) + len(v) + 1 for q, v in queries) + 1
    body = length - fixed
    if body < 0:
        _too_short("kv_recall_document", length, fixed)
    text = _spread(rng, lines, body) + "\n"
    answers = []
    for q, v in queries:
        text += q
        answers.append((len(text), len(text) + len(v)))
        text += v + "."
    return Document(text, answers, "kv_recall")


KEY_ALPHABET = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in FILLER)  # one-token keys: no filler byte


def kv_key_document(rng: random.Random, length: int, n_pairs: int, n_queries: int = 2) -> Document:
    """Multi-key needle retrieval a byte-level tiny model can learn: `n_pairs` needles "K73519" (a one-byte key from
    KEY_ALPHABET, capitals that never occur in FILLER, right before a 5-digit value) spread through filler, then
    `n_queries` distinct keys asked as "K", each answered by its value and ".".

    Why this form: in `kv_recall_document` the question "key#" must match the two-token context (key, "#") among
    several "#"s, a second-order induction the 4M tiny model does not form in budget (key-value 0.00 exact where the
    passkey, one unique "#", reaches 1.00). Here every key is one token that occurs once before its question, so
    attending to the earlier copy of the key and reading on (first-order induction, what the passkey uses) answers
    it, and the right needle is still chosen by its key among `n_pairs - 1` distractors."""
    if not 1 <= n_queries <= n_pairs <= len(KEY_ALPHABET):
        raise ValueError(f"corpus.py kv_key_document: n_pairs={n_pairs}, n_queries={n_queries}; need 1 <= n_queries "
                         f"<= n_pairs <= {len(KEY_ALPHABET)}")
    keys = rng.sample(KEY_ALPHABET, n_pairs)
    values = [str(rng.randrange(10000, 100000)) for _ in keys]
    asked = rng.sample(range(n_pairs), n_queries)
    lines = [f"\n{k}{v}\n" for k, v in zip(keys, values)]
    fixed = sum(map(len, lines)) + n_queries * 8 + 1  # each query: "\nK" + 5 digits + "."
    body = length - fixed
    if body < 0:
        _too_short("kv_key_document", length, fixed)
    text = _spread(rng, lines, body) + "\n"
    answers = []
    for i in asked:
        text += f"\n{keys[i]}"
        answers.append((len(text), len(text) + len(values[i])))
        text += values[i] + "."
    return Document(text, answers, "kv_key")


def multihop_document(rng: random.Random, length: int, hops: int = 3, n_distractors: int = 2) -> Document:
    """A chain "a refers to b", "b refers to c", ... scattered in shuffled order among distractor chains;
    the question names the chain's start and the answer is its end (`hops` references to follow)."""
    if hops < 1:
        raise ValueError(f"corpus.py multihop_document: hops={hops}; pass hops >= 1")
    names = _names(rng, (hops + 1) * (1 + n_distractors))
    chains = [names[i:i + hops + 1] for i in range(0, len(names), hops + 1)]
    facts = [f" Note: {c[j]} refers to {c[j + 1]}. " for c in chains for j in range(hops)]
    rng.shuffle(facts)
    target = chains[0]
    question = f" Start at {target[0]} and follow the references. The chain ends at "
    fixed = sum(map(len, facts)) + len(question) + len(target[-1]) + 1
    body = length - fixed
    if body < 0:
        _too_short("multihop_document", length, fixed)
    text = _spread(rng, facts, body) + question
    return Document(text + target[-1] + ".", [(len(text), len(text) + len(target[-1]))], "multihop")


def synthetic_documents(seed: int, n: int, length: int, n_pairs: int = 8) -> list[Document]:
    """n long-range documents, cycling passkey / kv-recall / multihop, reproducible from `seed`."""
    rng = random.Random(seed)
    makers = (lambda: passkey_document(rng, length), lambda: kv_recall_document(rng, length, n_pairs),
              lambda: multihop_document(rng, length))
    return [makers[i % 3]() for i in range(n)]


MIN_RETRIEVAL_LENGTH = 140  # the longest fixed part: a one-hop chain with one distractor (133 characters)


RETRIEVAL_MIX = ("passkey", "passkey", "kv_recall", "kv_recall", "multihop")


def retrieval_documents(seed: int, n: int, min_length: int, max_length: int, kinds: tuple = RETRIEVAL_MIX
                        ) -> list[Document]:
    """n long-range documents of random lengths in [min_length, max_length], so that the needle sits at every
    distance from its question: passkeys, key-value recall with several queries each (most answer tokens per
    document), and multi-hop chains (one hop below 200 characters, where two do not fit). Document i is of
    kind `kinds[i % len(kinds)]` (default 2:2:1); reproducible from `seed`."""
    if not MIN_RETRIEVAL_LENGTH <= min_length <= max_length:
        raise ValueError(f"corpus.py retrieval_documents: need {MIN_RETRIEVAL_LENGTH} <= min_length <= max_length "
                         f"(got {min_length}, {max_length})")
    unknown = sorted(set(kinds) - {"passkey", "kv_recall", "kv_key", "multihop"})
    if not kinds or unknown:
        raise ValueError(f"corpus.py retrieval_documents: kinds={kinds!r}; use passkey, kv_recall, kv_key and "
                         "multihop")
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.randint(min_length, max_length)
        kind = kinds[i % len(kinds)]
        if kind == "passkey":
            docs.append(passkey_document(rng, length))
        elif kind == "kv_recall":
            # 15 characters per pair and per query ("\nkey#value\n", "\nkey#value."): up to 8 queries (30 characters
            # of room each: most answer tokens per document), then at least as many pairs, as many as fit (up to 8)
            n_queries = rng.randint(2, max(2, min(8, (length - 1) // 30)))
            n_pairs = rng.randint(n_queries, max(n_queries, min(8, (length - 1) // 15 - n_queries)))
            docs.append(kv_recall_document(rng, length, n_pairs, n_queries))
        elif kind == "kv_key":
            # 8 characters per pair and per query ("\nK73519\n", "\nK73519."): 2 to 8 needles, 1 to 4 of them asked
            n_pairs = rng.randint(2, max(2, min(8, (length - 9) // 16)))
            docs.append(kv_key_document(rng, length, n_pairs, rng.randint(1, min(4, n_pairs))))
        else:
            docs.append(multihop_document(rng, length, hops=rng.randint(1, 2 if length >= 200 else 1), n_distractors=1))
    return docs


COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def copy_document(rng: random.Random, length: int, min_word: int = 3, max_word: int = 8, max_words: int = 12
                  ) -> Document:
    """Episodes "w1 w2 .. wn / w1 w2 .. wn|" of 1 to `max_words` random words (lowercase letters and digits:
    retrieval answers are digits), `length` characters in all. From its second character on, a repeat can
    only be predicted by finding the first copy, up to ~100 tokens back, and reading on (an induction head).
    Such episodes grow induction heads within a few hundred steps, where passkey and key-value documents
    alone, whose answers are a few tokens in hundreds, do not (the circuit every retrieval task reuses).
    The answers are the repeats after their first character."""
    if not 1 <= min_word <= max_word or max_words < 1 or length < 2 * max_word + 4:
        raise ValueError(f"corpus.py copy_document: need 1 <= min_word <= max_word, max_words >= 1 and length >= "
                         f"2 * max_word + 4 (got length={length}, min_word={min_word}, max_word={max_word}, "
                         f"max_words={max_words})")
    text, answers = "", []
    while True:
        words = " ".join("".join(rng.choice(COPY_ALPHABET) for _ in range(rng.randint(min_word, max_word)))
                         for _ in range(rng.randint(1, max_words)))
        if len(text) + 2 * len(words) + 4 > length:
            if " " not in words:
                break
            continue  # a shorter episode may still fit
        text += words + " / "
        answers.append((len(text) + 1, len(text) + len(words)))
        text += words + "|"
    return Document(text, answers, "copy")


def repeat_document(rng: random.Random, length: int, min_period: int = 4, max_period: int = 12,
                    max_repeats: int = 3) -> Document:
    """Exactly `length` characters of episodes "sss|": a string s of `min_period`..`max_period` distinct
    characters (COPY_ALPHABET) said 2 to `max_repeats` times, the last episode cut at `length`.

    The optional first phase of the DSA recipe (short rows of these only): with distinct characters a token's
    earlier occurrence marks one place, so copying what followed it is the only way to predict a repeat. Measured
    on the tiny model (rows of 32, batch 32): copying jumps after ~1300-1500 steps, but it stays specific to such
    immediate repeats (it does not copy across a gap, nor the digits of a passkey). The answers are the repeats
    after their first character (which could also be "|")."""
    if not 2 <= min_period <= max_period <= len(COPY_ALPHABET) or max_repeats < 2 or length < 2 * min_period:
        raise ValueError(f"corpus.py repeat_document: need 2 <= min_period <= max_period <= {len(COPY_ALPHABET)}, "
                         f"max_repeats >= 2 and length >= 2 * min_period (got length={length}, min_period="
                         f"{min_period}, max_period={max_period}, max_repeats={max_repeats})")
    text, answers = "", []
    while len(text) < length:
        s = "".join(rng.sample(COPY_ALPHABET, rng.randint(min_period, max_period)))
        text += s
        for _ in range(rng.randint(2, max_repeats) - 1):
            answers.append((len(text) + 1, len(text) + len(s)))
            text += s
        text += "|"
    answers = [(a, min(b, length)) for a, b in answers if a < length]
    return Document(text[:length], answers, "repeat")


def digit_copy_document(rng: random.Random, length: int, min_digits: int = 4, max_digits: int = 7) -> Document:
    """At most `length` characters: "<filler>#<digits><filler>#<digits>.", a random digit string (digits may repeat)
    said twice with random filler before and between; the answer is the second copy.

    The pass key without its words. Digits repeat inside a string, so copying it in order needs more than "what
    followed this digit before" (the passkey errors of a model without it: "69294" -> "99244"). Measured on the tiny
    model (continuing the copy-curriculum recipe's pretrained model, rows of 48, batch 32, lr 2e-3, 1200 steps): exact
    copies 0.00 -> 1.00 at 47 characters and 0.02 -> 0.42 at 100, where a passkey-format run of the same cost stayed
    flat."""
    if not 1 <= min_digits <= max_digits or length < 2 * max_digits + 3:
        raise ValueError(f"corpus.py digit_copy_document: need 1 <= min_digits <= max_digits and length >= "
                         f"2 * max_digits + 3 (got length={length}, min_digits={min_digits}, max_digits={max_digits})")
    n = rng.randint(min_digits, max_digits)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    room = length - 2 * (n + 1) - 1
    gap = rng.randint(0, room)
    before = rng.randint(0, room - gap)
    text = filler(rng, before) + ANSWER_MARK + digits + filler(rng, gap) + ANSWER_MARK
    return Document(text + digits + ".", [(len(text), len(text) + n)], "copy")


def answer_weights(doc: Document, n_tokens: int, weight: float) -> list[float]:
    """Per-token loss weights of a synthetic document: `weight` on its answer spans, 1 elsewhere (ASCII text:
    character offsets are token offsets)."""
    w = [1.0] * n_tokens
    for a, b in doc.answers:
        w[a:b] = [weight] * (b - a)
    return w


def pack(docs_token_lists: list[list[int]], seq_len: int, rng: random.Random | None = None, *,
         eos_id: int = EOS_ID, pad_id: int = PAD_ID, weights: list[list[float]] | None = None,
         whole: list[bool] | None = None):
    """Concatenate documents (each followed by eos, in an order shuffled by `rng`; None keeps it) and cut
    the stream into rows of L = seq_len + 1 tokens; the last row is padded with `pad_id`.

    Returns input_ids_NL and doc_ids_NL: the segment of every token, counting 0, 1, ... within each row
    (a document cut by a row boundary continues as segment 0 of the next row); padding is -1. Pass
    doc_ids to the model so attention and the indexer stay inside each document.

    weights: optional per-token loss weights, one list per document (the eos gets 1, padding 0); when
    given, a third tensor weights_NL is returned, packed exactly like the tokens.

    whole: optional flag per document. A flagged document that fits one row (eos included) is never cut
    by a row boundary: a retrieval question cut from its needle cannot be learned, only memorised. The
    flagged documents are packed into rows best-fit (longest first), the room they leave is filled with
    the stream of unflagged documents (cut anywhere, as without flags) or padded once it runs out, the
    rows are shuffled by `rng`, and the rest of the stream follows as plain rows.
    """
    n_docs = len(docs_token_lists)
    if weights is not None and [len(w) for w in weights] != [len(d) for d in docs_token_lists]:
        raise ValueError("corpus.py pack: weights must hold one weight per token of every document")
    if whole is not None and len(whole) != n_docs:
        raise ValueError(f"corpus.py pack: whole has {len(whole)} flags for {n_docs} documents; pass one per document")
    if seq_len < 1:
        raise ValueError(f"corpus.py pack: seq_len={seq_len}; pass seq_len >= 1")
    L = seq_len + 1
    order = list(range(n_docs))
    if rng is not None:
        rng.shuffle(order)

    def pieces(i: int) -> tuple[list[int], list[int], list[float]]:
        doc = list(docs_token_lists[i]) + [eos_id]
        return doc, [i] * len(doc), (list(weights[i]) + [1.0]) if weights is not None else []

    kept = [i for i in order if whole is not None and whole[i] and len(docs_token_lists[i]) + 1 <= L]
    kept_set = set(kept)
    free_t, free_o, free_w = [], [], []  # the unflagged documents as one stream, cut anywhere
    for i in order:
        if i not in kept_set:
            t, o, w = pieces(i)
            free_t += t
            free_o += o
            free_w += w
    # Best fit, longest first: each flagged document goes to the row with the least room that holds it
    # (few padded tokens); `sorted` is stable, so equal lengths keep the shuffled order.
    rows_docs: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(kept, key=lambda i: -len(docs_token_lists[i])):
        need = len(docs_token_lists[i]) + 1
        j = bisect.bisect_left(rooms, (need, -1))
        if j == len(rooms):
            rows_docs.append([i])
            room, row = L - need, len(rows_docs) - 1
        else:
            room, row = rooms.pop(j)
            rows_docs[row].append(i)
            room -= need
        bisect.insort(rooms, (room, row))
    rows: list[tuple[list[int], list[int], list[float]]] = []
    used = 0  # free tokens placed so far
    for docs_in_row in rows_docs:  # each row: its flagged documents, then free tokens, then padding
        t, o, w = [], [], []
        for i in docs_in_row:
            a, b, c = pieces(i)
            t, o, w = t + a, o + b, w + c
        take = min(L - len(t), len(free_t) - used)
        t, o, w = t + free_t[used:used + take], o + free_o[used:used + take], w + free_w[used:used + take]
        used += take
        rows.append((t + [pad_id] * (L - len(t)), o + [-1] * (L - len(o)), w + [0.0] * (L - len(t))))
    if rng is not None and rows:
        rng.shuffle(rows)
    tokens = [x for r in rows for x in r[0]] + free_t[used:]
    owner = [x for r in rows for x in r[1]] + free_o[used:]
    wts = [x for r in rows for x in r[2]] + free_w[used:]
    if not tokens:
        raise ValueError("corpus.py pack: no documents to pack; pass at least one non-empty token list")
    n = -(-len(tokens) // L)
    pad = n * L - len(tokens)
    ids_NL = torch.tensor(tokens + [pad_id] * pad, dtype=torch.long).view(n, L)
    owner_NL = torch.tensor(owner + [-1] * pad, dtype=torch.long).view(n, L)
    # A new segment wherever the owning document changes; the row's first token starts segment 0.
    new_NL = torch.ones_like(owner_NL)
    new_NL[:, 1:] = (owner_NL[:, 1:] != owner_NL[:, :-1]).long()
    new_NL[:, 0] = 0
    doc_ids_NL = new_NL.cumsum(dim=1).masked_fill(owner_NL < 0, -1)
    if weights is not None:
        return ids_NL, doc_ids_NL, torch.tensor(wts + [0.0] * pad, dtype=torch.float32).view(n, L)
    return ids_NL, doc_ids_NL
