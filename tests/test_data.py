"""dsv32.data: tokenizer round trips, corpus determinism and answer spans, packing, loaders, resume."""

import random

import pytest
import torch

from dsv32.data import (SPECIALS, ByteTokenizer, PackedDataset, kv_recall_document, multihop_document,
                        natural_documents, pack, passkey_document, read_jsonl, read_parquet, read_text_files,
                        synthetic_documents)
from dsv32.data.corpus import ANSWER_MARK

TOK = ByteTokenizer()


def test_tokenizer_round_trip_specials_and_unicode():
    assert TOK.vocab_size == 256 + len(SPECIALS) <= 512
    text = "<｜User｜>héllo 世界 🙂<｜Assistant｜><think>x</think>done<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f" \
           "<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜><pad>"
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and max(ids) < TOK.vocab_size
    assert ids[1] == TOK.token_id("<｜User｜>") and ids[-2] == TOK.pad_id
    assert TOK.decode(ids) == SPECIALS[0] + text + SPECIALS[1]
    assert TOK.decode(ids, skip_special=True) == "héllo 世界 🙂xdonef{}"
    assert len(set(TOK.special_to_id.values())) == len(SPECIALS)
    # Longest match: the tool_calls strings are not split into tool_call + leftovers.
    assert TOK.encode("<｜tool▁outputs▁begin｜>") == [TOK.token_id("<｜tool▁outputs▁begin｜>")]
    assert TOK.encode("<think") == list(b"<think")  # an unfinished special is plain bytes
    assert TOK.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([TOK.vocab_size])


@pytest.mark.parametrize("make", [lambda r: passkey_document(r, 2000), lambda r: kv_recall_document(r, 3000, 12),
                                  lambda r: multihop_document(r, 2000, hops=4)])
def test_synthetic_documents_deterministic_with_answers_at_spans(make):
    a, b, c = make(random.Random(7)), make(random.Random(7)), make(random.Random(8))
    assert a == b and a.text != c.text
    assert abs(len(a.text) - (2000 if a.kind != "kv_recall" else 3000)) <= 1 and a.text.isascii()
    assert a.answers and all(0 < s < e <= len(a.text) for s, e in a.answers)
    for s, e in a.answers:
        ans = a.text[s:e]
        assert ans.strip() == ans and ans, ans
        assert a.text[e] == "."  # the span is the whole answer, nothing more
        if a.kind != "multihop":
            assert a.text[s - 1] == ANSWER_MARK  # right after the mark, in the needle's own form
    if a.kind == "passkey":
        key = a.answer_texts()[0]
        assert a.text.count(ANSWER_MARK) == 2 and f"The pass key is {ANSWER_MARK}{key}." in a.text[:a.answers[0][0]]
        assert a.text[:a.answers[0][0]].endswith(f"The pass key is {ANSWER_MARK}")  # the question restates it
    if a.kind == "kv_recall":
        for (s, _), v in zip(a.answers, a.answer_texts()):
            key = a.text[:s].rsplit("\n", 1)[1][:-1]
            assert f"\n{key}{ANSWER_MARK}{v}\n" in a.text[:s]
    if a.kind == "multihop":
        start = a.text.split("Start at ")[1].split(" ")[0]
        node = start
        for _ in range(4):
            node = a.text.split(f"Note: {node} refers to ")[1].split(".")[0]
        assert node == a.answer_texts()[0] and f"Note: {node} refers to" not in a.text


def test_passkey_depths_vary_and_short_length_is_an_error():
    depths = {passkey_document(random.Random(s), 1000).text.index("pass key is") for s in range(10)}
    assert len(depths) > 5
    shallow, deep = passkey_document(random.Random(0), 400, 0.0), passkey_document(random.Random(0), 400, 1.0)
    assert shallow.text.index("pass key is") < 10 and deep.text.index("pass key is") > 300
    with pytest.raises(ValueError, match="depth"):
        passkey_document(random.Random(0), 400, 1.5)
    with pytest.raises(ValueError, match="length >= "):
        passkey_document(random.Random(0), 20)
    assert [d.kind for d in synthetic_documents(0, 4, 800)] == ["passkey", "kv_recall", "multihop", "passkey"]


def test_natural_documents_are_separate_and_stable():
    docs = natural_documents()
    assert len(docs) > 100 and docs == natural_documents() and len(set(docs)) == len(docs)


def test_pack_rows_doc_ids_and_labels():
    rng = random.Random(0)
    docs = [[rng.randrange(256) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
    seq_len = 16
    ids, doc_ids = pack(docs, seq_len, random.Random(1))
    total = sum(len(d) + 1 for d in docs)
    assert ids.shape == doc_ids.shape == (-(-total // (seq_len + 1)), seq_len + 1)
    flat, flat_docs = ids.flatten().tolist(), doc_ids.flatten()
    assert flat.count(TOK.eos_id) == len(docs) and flat[total:] == [TOK.pad_id] * (len(flat) - total)
    assert (flat_docs[total:] == -1).all() and (flat_docs[:total] >= 0).all()
    # Rebuild document starts from the stream: position 0 and every position after an eos.
    starts = {0} | {i + 1 for i, t in enumerate(flat[:total - 1]) if t == TOK.eos_id}
    L = seq_len + 1
    for i in range(1, total):
        if i % L == 0:
            assert flat_docs[i] == 0  # segments restart per row
        else:
            assert (flat_docs[i] != flat_docs[i - 1]) == (i in starts), i
    # Every document comes out whole; rng shuffles the order, None keeps it.
    assert sorted(map(tuple, docs)) == sorted(tuple(flat[s:flat.index(TOK.eos_id, s)]) for s in starts)
    order_none, _ = pack(docs, seq_len, None)
    assert order_none.flatten().tolist()[:len(docs[0])] == docs[0] and not torch.equal(order_none, ids)

    batch = PackedDataset.make_batch(ids, doc_ids)
    x, y, d = batch["input_ids"], batch["labels"], batch["doc_ids"]
    assert x.shape == y.shape == d.shape == (ids.shape[0], seq_len)
    keep = y != -100
    assert torch.equal(y[keep], ids[:, 1:][keep])
    # Masked exactly where the target starts another document or is padding.
    expect_masked = (doc_ids[:, 1:] != doc_ids[:, :-1]) | (doc_ids[:, 1:] == -1)
    assert torch.equal(~keep, expect_masked) and expect_masked.any()
    # The eos closing a document is a target of that document; the token after an eos never is.
    assert (keep & (y == TOK.eos_id)).sum() >= len(docs) - ids.shape[0]
    assert not keep[x == TOK.eos_id].any()


def test_packed_rows_keep_attention_inside_documents():
    from dsv32 import Transformer, presets
    torch.manual_seed(0)
    model = Transformer(presets.tiny()).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    ids, docs = pack([a, b], 8, None)
    with torch.no_grad():
        packed = model(ids[:, :-1], doc_ids=docs[:, :-1])
        alone = model(torch.tensor([b + [TOK.eos_id]]))
    # b starts after a + eos (6 tokens); its logits must not depend on a.
    assert torch.allclose(packed[0, 6:8], alone[0, :2], atol=1e-4)


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4: invalid JSON"):
        read_jsonl(p)
    p.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: missing key 'text'"):
        read_jsonl(p)
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1: missing key 'body'"):
        read_jsonl(p, field="body")
    p.write_text('{"text": "one"}\n{"text": "twö"}\n', encoding="utf-8")
    assert read_jsonl(p) == ["one", "twö"]
    f = tmp_path / "a.txt"
    f.write_text("hello", encoding="utf-8")
    assert read_text_files([f]) == ["hello"]
    with pytest.raises(ValueError, match="missing.txt"):
        read_text_files([tmp_path / "missing.txt"])


def test_read_parquet_or_clear_error(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ValueError, match="pyarrow is not installed"):
            read_parquet(tmp_path / "x.parquet")
        return
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "x.parquet")
    assert read_parquet(tmp_path / "x.parquet") == ["a", "b"]


def test_dataset_resumes_at_the_exact_next_batch():
    texts = [d.text for d in synthetic_documents(0, 12, 600)] + natural_documents()[:20]
    make = lambda: PackedDataset.from_texts(texts, TOK, seq_len=64, seed=3)
    ds = make()
    B = 4
    it = ds.batches(B)
    first = [next(it) for _ in range(5)]
    state = ds.state_dict()
    after = [next(it) for _ in range(3)]
    fresh = make()
    fresh.load_state_dict(state)
    resumed = [b for _, b in zip(range(3), fresh.batches(B))]
    for u, v in zip(after, resumed):
        assert all(torch.equal(u[k], v[k]) for k in ("input_ids", "labels", "doc_ids"))
    assert not torch.equal(first[-1]["input_ids"], after[0]["input_ids"])
    # One epoch visits every row once; the next epoch is another order.
    ds2 = make()
    epoch0 = torch.cat([b["input_ids"] for b in ds2.batches(1, epochs=1)])
    assert epoch0.shape[0] == len(ds2) and ds2.state_dict()["epoch"] == 1
    epoch1 = torch.cat([b["input_ids"] for b in ds2.batches(1, epochs=2)])
    assert not torch.equal(epoch0, epoch1)
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, epoch1.tolist()))
    with pytest.raises(ValueError, match="saved for"):
        PackedDataset(ds.input_ids_NL[:2], ds.doc_ids_NL[:2]).load_state_dict(state)


def test_retrieval_documents_vary_in_length_and_weights_follow_the_answers():
    from dsv32.data.corpus import retrieval_documents

    docs = retrieval_documents(3, 25, 256, 700)
    assert {d.kind for d in docs} == {"passkey", "kv_recall", "multihop"}
    assert all(256 <= len(d.text) <= 700 for d in docs) and len({len(d.text) for d in docs}) > 10
    assert [d.text for d in docs] == [d.text for d in retrieval_documents(3, 25, 256, 700)]
    ds = PackedDataset.from_documents(docs + ["plain text, weight one"], TOK, seq_len=1000, seed=0, answer_weight=4.0)
    # Every answer token weighs 4 and nothing else does: total weight = tokens + 3 * answer tokens.
    n_answer = sum(b - a for d in docs for a, b in d.answers)
    n_tokens = sum(len(d.text) + 1 for d in docs) + len("plain text, weight one") + 1
    assert ds.weights_NL.sum().item() == pytest.approx(n_tokens + 3 * n_answer)
    batch = next(ds.batches(2))
    w, labels = batch["loss_weights"], batch["labels"]
    assert w.shape == labels.shape and bool((w[labels == -100] == 0).all())
    assert set(w[labels != -100].unique().tolist()) <= {1.0, 4.0}
    # The answer digits are exactly the labels that weigh 4.
    digits = {ord(c) for c in "0123456789"} | {ord(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    assert all(t in digits for t in labels[w == 4].tolist())


def test_short_retrieval_documents_fit_rows_of_256_with_their_answers():
    """Rows of 256 tokens: every synthetic document (its eos included) fits one row, so no question is cut
    from its needle; below 200 characters the multi-hop chains take one hop; below the minimum is an error."""
    from dsv32.data.corpus import MIN_RETRIEVAL_LENGTH, retrieval_documents
    from dsv32.train.stages import build_documents

    docs = retrieval_documents(5, 60, MIN_RETRIEVAL_LENGTH, 199)
    assert {d.kind for d in docs} == {"passkey", "kv_recall", "multihop"}
    assert all(MIN_RETRIEVAL_LENGTH <= len(d.text) <= 199 for d in docs)
    for d in docs:
        assert d.answers and all(ans.isalnum() for ans in d.answer_texts())
        if d.kind == "multihop":
            assert d.text.count("refers to") == 2  # one hop, one distractor chain
    synthetic = [d for d in build_documents(256, seed=0, n_synthetic=40, min_synthetic_length=100)
                 if not isinstance(d, str)]
    assert len(synthetic) == 40 and all(MIN_RETRIEVAL_LENGTH <= len(d.text) <= 255 for d in synthetic)
    with pytest.raises(ValueError, match="min_length"):
        retrieval_documents(0, 3, MIN_RETRIEVAL_LENGTH - 1, 300)


def test_copy_documents_answer_with_the_repeat_of_each_word():
    from dsv32.data.corpus import copy_document
    from dsv32.train.stages import build_documents

    doc = copy_document(random.Random(4), 200)
    assert doc.kind == "copy" and 180 <= len(doc.text) <= 200 and doc.text.endswith("|")
    episodes = doc.text[:-1].split("|")
    assert len(episodes) == len(doc.answers) >= 2
    for episode, answer in zip(episodes, doc.answer_texts()):
        first, second = episode.split(" / ")
        assert first == second and answer == second[1:]  # the first character of a repeat is not predictable
    lengths = {len(d.text.split("|")[0].split(" / ")[0].split()) for d in
               (copy_document(random.Random(s), 250) for s in range(20))}
    assert len(lengths) > 3  # the distance to the first copy varies
    with pytest.raises(ValueError, match="length"):
        copy_document(random.Random(0), 10)
    docs = build_documents(256, seed=0, n_synthetic=0, n_copy=30)
    copies = [d for d in docs if not isinstance(d, str)]
    assert len(copies) == 30 and all(d.kind == "copy" and len(d.text) <= 255 for d in copies)


def test_repeat_documents_fill_the_length_and_answer_with_every_repeat():
    from dsv32.data.corpus import repeat_document
    from dsv32.train.stages import build_repeat_dataset

    for seed in range(5):
        doc = repeat_document(random.Random(seed), 64)
        assert doc.kind == "repeat" and len(doc.text) == 64
        episodes = doc.text.split("|")
        full = episodes[:-1]  # the last one is cut at the length
        assert full and all(len(e) % len(set(e)) == 0 and 2 <= len(e) // len(set(e)) <= 3 for e in full)
        for e in full:
            s = e[:len(set(e))]
            assert len(set(s)) == len(s) and 4 <= len(s) <= 12 and e == s * (len(e) // len(s))
        # Each answer is a repeat without its first character, and sits one period after the same text.
        for (a, b), text in zip(doc.answers, doc.answer_texts()):
            period = next(p for p in range(4, 13) if doc.text[a - p:b - p] == text and doc.text[a - 1 - p] == doc.text[a - 1])
            assert 1 <= b - a <= period - 1
    assert repeat_document(random.Random(3), 200).text == repeat_document(random.Random(3), 200).text
    with pytest.raises(ValueError, match="max_period"):
        repeat_document(random.Random(0), 64, min_period=8, max_period=4)
    from dsv32.train.stages import build_documents

    mixed = [d for d in build_documents(256, seed=0, n_synthetic=0, n_repeat=6) if not isinstance(d, str)]
    assert len(mixed) == 6 and all(d.kind == "repeat" and 64 <= len(d.text) <= 255 for d in mixed)
    assert len({len(d.text) for d in mixed}) > 1
    ds = build_repeat_dataset(32, seed=0, n_rows=10, answer_weight=4.0)
    assert len(ds) == 10 and bool((ds.doc_ids_NL == 0).all())  # one whole document per row, no padding
    assert ds.input_ids_NL[:, -1].eq(TOK.eos_id).all()
    assert set(ds.weights_NL.unique().tolist()) == {1.0, 4.0}


def test_digit_copy_documents_repeat_the_digits_after_the_mark():
    from dsv32.data.corpus import digit_copy_document
    from dsv32.train.stages import build_documents, build_repeat_dataset

    for seed in range(20):
        doc = digit_copy_document(random.Random(seed), 47)
        assert doc.kind == "copy" and len(doc.text) <= 47 and doc.text.count(ANSWER_MARK) == 2
        (s, e), = doc.answers
        digits = doc.text[s:e]
        assert digits.isdigit() and 4 <= len(digits) <= 7 and doc.text[e:] == "."
        first = doc.text.index(ANSWER_MARK)
        assert doc.text[first + 1:first + 1 + len(digits)] == digits and doc.text[s - 1] == ANSWER_MARK
    gaps = {d.text.rindex(ANSWER_MARK) - d.text.index(ANSWER_MARK) for d in
            (digit_copy_document(random.Random(s), 100) for s in range(30))}
    assert min(gaps) < 20 < 40 < max(gaps)  # the copies sit at many distances: no fixed offset to learn
    with pytest.raises(ValueError, match="digit_copy_document"):
        digit_copy_document(random.Random(0), 10)
    mixed = [d for d in build_documents(256, seed=0, n_synthetic=0, n_digit_copy=5) if not isinstance(d, str)]
    assert len(mixed) == 5 and all(d.kind == "copy" and len(d.text) <= 255 for d in mixed)
    ds = build_repeat_dataset(48, seed=0, n_rows=6, answer_weight=4.0, kind="digits")
    assert len(ds) <= 6 and set(ds.weights_NL.unique().tolist()) >= {1.0, 4.0}
    with pytest.raises(ValueError, match="kind"):
        build_repeat_dataset(48, seed=0, n_rows=6, kind="digit")


def test_weighted_cross_entropy_reduces_to_the_plain_mean():
    from dsv32.train.loop import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 0] = -100
    plain = cross_entropy(logits, {"labels": labels})
    assert cross_entropy(logits, {"labels": labels, "loss_weights": torch.ones(2, 5)}).item() == pytest.approx(plain.item())
    w = torch.ones(2, 5)
    w[1, 2] = 0.0
    keep = (labels.flatten() != -100) & (w.flatten() > 0)
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[keep], labels.flatten()[keep])
    assert cross_entropy(logits, {"labels": labels, "loss_weights": w}).item() == pytest.approx(manual.item())


def test_validation_split_is_disjoint_from_training():
    from dsv32.train.stages import build_documents

    train = build_documents(512, seed=0, n_synthetic=10, min_synthetic_length=256)
    val = build_documents(512, seed=0, n_synthetic=10, min_synthetic_length=256, split="val")
    as_text = lambda docs: {d if isinstance(d, str) else d.text for d in docs}  # noqa: E731
    assert as_text(train).isdisjoint(as_text(val)) and len(val) > 10


def test_natural_documents_do_not_depend_on_what_was_imported_before():
    import subprocess
    import sys

    code = "from dsv32.data import natural_documents as n; import hashlib; print(hashlib.sha1(repr(n()).encode()).hexdigest())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    after = subprocess.run([sys.executable, "-c", "import json.decoder, logging.handlers, email.mime; " + code],
                           capture_output=True, text=True, check=True).stdout
    assert plain == after and len(plain.strip()) == 40


def test_pack_keeps_flagged_documents_whole_in_one_row():
    """A retrieval document cut by a row boundary loses its needle or its question (before the fix about
    half of the recipe's answer tokens sat in such cut pieces); flagged documents must stay whole."""
    rng = random.Random(3)
    L = 33
    docs = [[rng.randrange(1, 200) for _ in range(rng.randrange(5, 32))] for _ in range(40)]
    whole = [i % 3 != 0 for i in range(40)]  # every third document is free text, cut anywhere
    weights = [[float(i)] * len(d) for i, d in enumerate(docs)]
    ids, doc_ids, w = pack(docs, L - 1, random.Random(1), weights=weights, whole=whole)
    assert ids.shape[1] == L and torch.equal(doc_ids < 0, ids == TOK.pad_id)
    segments = []
    for r in range(ids.shape[0]):
        for s in doc_ids[r].unique().tolist():
            if s >= 0:
                m = doc_ids[r] == s
                segments.append((ids[r][m].tolist(), w[r][m].tolist()))
    for i, d in enumerate(docs):
        if whole[i]:  # exactly one segment holds the document and its eos, weights alongside
            assert [seg for seg, _ in segments].count(d + [TOK.eos_id]) == 1
            assert (d + [TOK.eos_id], [float(i)] * len(d) + [1.0]) in segments
    # The free documents keep their order as one stream and lose no token.
    flagged = {tuple(d + [TOK.eos_id]) for i, d in enumerate(docs) if whole[i]}
    free_stream = [t for r in range(ids.shape[0]) for s in doc_ids[r].unique().tolist() if s >= 0
                   for t in ids[r][doc_ids[r] == s].tolist() if tuple(ids[r][doc_ids[r] == s].tolist()) not in flagged]
    assert sorted(free_stream) == sorted(t for i, d in enumerate(docs) if not whole[i] for t in d + [TOK.eos_id])
    # Best fit wastes little: padding below 10% of the rows here.
    assert (doc_ids < 0).float().mean() < 0.1
    # Without flags (or with none set) the packing is the plain cut stream.
    plain = pack(docs, L - 1, random.Random(1))
    assert torch.equal(pack(docs, L - 1, random.Random(1), whole=[False] * 40)[0], plain[0])
    with pytest.raises(ValueError, match="whole"):
        pack(docs, L - 1, whole=[True])
    ds = PackedDataset.from_documents([passkey_document(random.Random(s), 150) for s in range(6)] + ["x" * 300],
                                      TOK, seq_len=256, answer_weight=4.0)
    for r in range(len(ds)):  # every answer (weight 4) sits in a segment holding its whole document
        for s in ds.doc_ids_NL[r].unique().tolist():
            m = ds.doc_ids_NL[r] == s
            if (ds.weights_NL[r][m] == 4).any():
                assert ds.input_ids_NL[r][m][-1] == TOK.eos_id and m.sum() == 151  # 150 characters + eos


def test_retrieval_documents_take_a_cycle_of_kinds():
    from dsv32.data.corpus import retrieval_documents

    docs = retrieval_documents(2, 40, 140, 255, kinds=("passkey", "kv_recall"))
    assert [d.kind for d in docs] == ["passkey", "kv_recall"] * 20
    pairs = {d.text.count(ANSWER_MARK) - len(d.answers) for d in docs if d.kind == "kv_recall"}
    assert max(pairs) >= 4 and all(len(d.text) <= 255 for d in docs)  # the evaluation's 4 pairs are covered
    with pytest.raises(ValueError, match="kinds"):
        retrieval_documents(2, 4, 140, 255, kinds=("passkey", "needle"))
