"""Long-context retrieval evaluation: the result's structure, the attention mode restored, the scorer's
power against oracles (right answers marked right, off-by-one answers marked wrong), and the CLI."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config
from dsv32 import Transformer
from dsv32.cli import main as cli_main
from dsv32.eval import retrieval_accuracy, score_documents, trailing_loss
from dsv32.eval.long_context import make_documents, passkey_at_depth, score_tokens

V = 300


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (seconds per forward on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(make_config(vocab_size=V)).eval()


def _oracle(shift: int = 0):
    """Logits that put all mass on the true next token (shift=0), or on the token `shift` further on."""
    def fn(ids_BT, doc_ids_BT):
        nxt = torch.roll(ids_BT, -1 - shift, dims=1)
        return F.one_hot(nxt, V).float() * 10
    return fn


def _docs():
    rng = random.Random(1)
    return (make_documents("passkey", 160, 3, rng) + make_documents("kv_recall", 160, 2, rng)
            + make_documents("multihop", 500, 1, rng))


def test_oracle_is_scored_correct_and_shifted_oracle_wrong():
    docs = _docs()
    right = score_documents(_oracle(0), docs, batch_size=2)
    assert [len(r) for r in right] == [len(d.answers) for d in docs]
    assert all(all(r) for r in right)
    wrong = score_documents(_oracle(1), docs)
    assert not any(any(r) for r in wrong)


def test_one_wrong_answer_token_fails_the_span():
    doc = passkey_at_depth(random.Random(0), 200, 0.5)
    s, e = doc.answers[0]
    good = _oracle(0)

    def one_off(ids_BT, doc_ids_BT):
        logits = good(ids_BT, doc_ids_BT).clone()
        logits[:, e - 2] = 0  # the guess for the answer's last digit
        logits[:, e - 2, (int(ids_BT[0, e - 1]) + 1) % V] = 10
        return logits

    assert score_documents(good, [doc]) == [[True]]
    assert score_documents(one_off, [doc]) == [[False]]
    # Partial credit: every digit but the last is right.
    assert score_tokens(one_off, [doc]) == [[[True] * (e - s - 1) + [False]]]


def test_copy_accuracy_against_oracles_and_a_real_model(model):
    from dsv32.data.corpus import repeat_document
    from dsv32.eval.long_context import copy_accuracy, copy_hits

    rng = random.Random(2)
    docs = [repeat_document(rng, 48) for _ in range(4)]
    assert all(copy_hits(_oracle(0), docs)) and len(copy_hits(_oracle(0), docs)) == sum(b - a for d in docs
                                                                                          for a, b in d.answers)
    assert not any(copy_hits(_oracle(1), docs))  # distinct characters: the token after next is never the next one
    model.set_attn_mode("sparse")
    acc = copy_accuracy(model, 64, n=4)
    assert 0.0 <= acc < 0.5 and model.cfg.attn_mode == "sparse"  # untrained: no copying; mode restored
    with pytest.raises(ValueError, match="mode"):
        copy_accuracy(model, 64, mode="dence")


def test_passkey_depths_place_the_needle():
    rng = random.Random(0)
    shallow, deep = passkey_at_depth(rng, 400, 0.1), passkey_at_depth(rng, 400, 0.9)
    assert len(shallow.text) == len(deep.text) == 400
    key_s, key_d = shallow.answer_texts()[0], deep.answer_texts()[0]
    assert shallow.text.index(f"The pass key is #{key_s}") < 100 < 200 < deep.text.index(f"The pass key is #{key_d}")


def test_retrieval_accuracy_structure_and_mode_restored(model):
    model.set_attn_mode("sparse")
    res = retrieval_accuracy(model, [160, 256], n=2, seed=3)
    assert model.cfg.attn_mode == "sparse"
    assert set(res) == {160, 256}
    for L, r in res.items():
        assert set(r) >= {"dense", "sparse", "kinds", "answers"}
        assert set(r["kinds"]) == {"passkey", "kv_recall"}
        assert r["answers"] == {"passkey": 2, "kv_recall": 4}
        for acc in [r["dense"], r["sparse"]] + [v for k in r["kinds"].values() for v in k.values()]:
            assert 0.0 <= acc <= 1.0
        for kind, modes in r["tokens"].items():  # a right answer has every token right: tokens >= exact
            assert all(r["kinds"][kind][m] <= t <= 1.0 for m, t in modes.items())
    model.set_attn_mode("dense")
    retrieval_accuracy(model, [160], n=1)
    assert model.cfg.attn_mode == "dense"


def test_retrieval_accuracy_rejects_too_long(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        retrieval_accuracy(model, [10_000], n=1)


def test_trailing_loss(model):
    ids = torch.randint(0, V, (2, 64))
    doc_ids = torch.zeros(2, 64, dtype=torch.long)
    doc_ids[:, 40:] = 1
    doc_ids[1, 60:] = -1
    model.set_attn_mode("dense")
    out = trailing_loss(model, ids, doc_ids, last=16)
    assert model.cfg.attn_mode == "dense"
    assert set(out) == {"dense", "sparse"}
    for r in out.values():
        assert r["last_tokens"] == 16 + 12 and r["all_tokens"] == 62 + 58
        assert r["last"] > 0 and r["all"] > 0
    # Rows of 64 > top-k 8 tokens: sparse attention differs from dense.
    assert out["dense"]["all"] != out["sparse"]["all"]


def test_cli_writes_json(tmp_path, capsys):
    torch.manual_seed(0)
    Transformer(make_config(vocab_size=V)).save_pretrained(tmp_path / "m")
    out = tmp_path / "res.json"
    rc = cli_main(["eval", "long-context", "--model", str(tmp_path / "m"), "--lengths", "160,200", "--n", "1",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "sparse" in printed and "160" in printed
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"160", "200"}
    assert 0 <= data["results"]["200"]["sparse"] <= 1


def test_cli_missing_dir_exits_2(tmp_path, capsys):
    rc = cli_main(["eval", "long-context", "--model", str(tmp_path / "nope"), "--lengths", "160"])
    assert rc == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli_main(["eval"]) == 2
