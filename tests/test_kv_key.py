"""Key-value recall with one-token keys (corpus.kv_key_document): format, uniqueness of keys, spans, the retrieval
mix and the evaluation that use it."""

import random

import pytest

from dsv32.data.corpus import FILLER, KEY_ALPHABET, MIN_RETRIEVAL_LENGTH, kv_key_document, retrieval_documents
from dsv32.eval.long_context import make_documents, score_documents


def test_key_alphabet_never_occurs_in_filler():
    assert KEY_ALPHABET and not set(KEY_ALPHABET) & set(FILLER)
    assert all(c.isupper() for c in KEY_ALPHABET)


@pytest.mark.parametrize("length,n_pairs,n_queries", [(140, 8, 4), (160, 4, 2), (256, 2, 1), (1000, 22, 22)])
def test_kv_key_document_format_and_spans(length, n_pairs, n_queries):
    doc = kv_key_document(random.Random(3), length, n_pairs, n_queries)
    assert len(doc.text) == length and doc.text.isascii() and doc.kind == "kv_key"
    assert doc == kv_key_document(random.Random(3), length, n_pairs, n_queries)
    assert len(doc.answers) == n_queries
    asked = []
    for (s, e), value in zip(doc.answers, doc.answer_texts()):
        key = doc.text[s - 1]
        asked.append(key)
        assert key in KEY_ALPHABET and len(value) == 5 and value.isdigit() and doc.text[e] == "."
        before = doc.text[:s - 1]
        # the key occurs exactly once before its question, right before its value (first-order induction answers it)
        assert before.count(key) == 1 and f"\n{key}{value}\n" in before
    assert len(set(asked)) == n_queries  # distinct keys are asked
    needles = [c for c in doc.text[:doc.answers[0][0]] if c in KEY_ALPHABET]
    assert len(needles) == n_pairs + 1 and len(set(needles[:-1])) == n_pairs  # every needle has its own key


def test_kv_key_document_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="n_queries"):
        kv_key_document(random.Random(0), 200, 2, 3)
    with pytest.raises(ValueError, match="n_pairs"):
        kv_key_document(random.Random(0), 2000, len(KEY_ALPHABET) + 1, 1)
    with pytest.raises(ValueError, match="length >= "):
        kv_key_document(random.Random(0), 30, 4, 2)


def test_retrieval_documents_with_kv_key_fit_the_shortest_length():
    docs = retrieval_documents(4, 60, MIN_RETRIEVAL_LENGTH, 255, kinds=("passkey", "kv_key"))
    assert [d.kind for d in docs] == ["passkey", "kv_key"] * 30
    keyed = [d for d in docs if d.kind == "kv_key"]
    assert all(MIN_RETRIEVAL_LENGTH <= len(d.text) <= 255 for d in docs)
    n_needles = {sum(c in KEY_ALPHABET for c in d.text[:d.answers[0][0] - 1]) for d in keyed}
    assert min(n_needles) >= 2 and max(n_needles) <= 8 and len(n_needles) > 3  # 2-8 needles, varied
    assert {len(d.answers) for d in keyed} <= {1, 2, 3, 4}


def test_make_documents_and_scoring_of_kv_key():
    docs = make_documents("kv_key", 160, 3, random.Random(0), kv_pairs=4, kv_queries=2)
    assert [len(d.answers) for d in docs] == [2, 2, 2]

    def oracle(ids_BT, doc_ids):  # logits that put the next true token first: every answer is right
        import torch

        logits = torch.zeros(*ids_BT.shape, 300)
        logits[:, :-1].scatter_(-1, ids_BT[:, 1:, None], 1.0)
        return logits

    assert score_documents(oracle, docs) == [[True, True]] * 3


def test_digit_rows_with_a_share_of_kv_key_rows():
    from dsv32.train.stages import build_repeat_dataset

    plain = build_repeat_dataset(48, seed=0, n_rows=40, answer_weight=4.0, kind="digits")
    mixed = build_repeat_dataset(48, seed=0, n_rows=40, answer_weight=4.0, kind="digits", kv_key_share=0.5)
    assert mixed.input_ids_NL.shape == plain.input_ids_NL.shape
    rows = ["".join(chr(t) for t in row.tolist() if t < 128) for row in mixed.input_ids_NL]
    keyed = [r for r in rows if any(c in KEY_ALPHABET for c in r)]
    assert 10 <= len(keyed) <= 30  # about half, at random
    assert all(len(r) <= 48 for r in rows)
    # a kv_key row (47 characters and eos) holds nothing else; every other row holds digit copies ("#" marks)
    assert all(("#" in r) != any(c in KEY_ALPHABET for c in r) for r in rows)
    with pytest.raises(ValueError, match="kv_key_share"):
        build_repeat_dataset(48, seed=0, n_rows=4, kind="repeat", kv_key_share=0.5)
    with pytest.raises(ValueError, match="too short"):
        build_repeat_dataset(20, seed=0, n_rows=4, kind="digits", kv_key_share=0.5)


def test_recipe_evaluates_the_trained_retrieval_kinds():
    from dsv32.train.recipe import Recipe, eval_kinds

    assert eval_kinds(Recipe()) == ("passkey", "kv_key")
    assert eval_kinds(Recipe(synthetic_kinds=("passkey", "kv_recall", "multihop"))) == ("passkey", "kv_recall")
    with pytest.raises(ValueError, match="synthetic_kinds"):
        eval_kinds(Recipe(synthetic_kinds=("multihop",)))
