"""The DSA training stages (dsa-anchors.md §2.1): pretrain, dsa-warmup (stage 1), dsa-sparse (stage 2), and
their `dsv32` commands."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config, scale_weights
from dsv32.cli import main as cli
from dsv32.model import Transformer
from dsv32.train import TrainConfig, stages

SEQ = 40  # > topk 8 of make_config: sparse mode really selects


@pytest.fixture(scope="module")
def dataset_factory():
    texts_cache = {}

    def make():
        if "ds" not in texts_cache:
            texts_cache["ds"] = stages.build_dataset(SEQ, seed=0, n_synthetic=3, synthetic_length=512, max_natural=12)
        ds = texts_cache["ds"]
        ds.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0})
        return ds

    return make


def _model():
    return scale_weights(Transformer(make_config(vocab_size=272)), std=0.2)


def _cfg(tmp_path, **kw):
    base = dict(lr=1e-3, steps=3, warmup_steps=0, batch_size=2, seq_len=SEQ, log_every=1, out_dir=str(tmp_path))
    return TrainConfig(**{**base, **kw})


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_stage1_trains_only_the_indexer_and_the_kl_falls(tmp_path, dataset_factory):
    model, ds = _model(), dataset_factory()
    probe = next(ds.batches(4))
    ds.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0})
    with torch.no_grad():
        kl0 = stages.indexer_kl_loss(model.set_attn_mode("dense"), probe)[0].item()
    before = _snapshot(model)
    summary = stages.run("dsa-warmup", model, stages.Stream(ds, 2), _cfg(tmp_path, steps=12))
    assert summary["steps"] == 12 and model.cfg.attn_mode == "dense"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (".indexer." not in n), n  # all others bitwise equal
    with torch.no_grad():
        kl1 = stages.indexer_kl_loss(model, probe)[0].item()
    assert kl1 < kl0
    recs = [r for r in _records(tmp_path) if "loss" in r]
    assert all("indexer_kl" in r and "grad_norm/indexer" in r and "grad_norm/main" not in r for r in recs)


def test_stage2_trains_both_groups_and_logs_both_losses(tmp_path, dataset_factory):
    model, ds = _model(), dataset_factory()
    before = _snapshot(model)
    stages.run("dsa-sparse", model, stages.Stream(ds, 2), _cfg(tmp_path, steps=3, lr=1e-4))
    assert model.cfg.attn_mode == "sparse"
    changed = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}
    indexer = [n for n in changed if ".indexer." in n]
    main = [n for n in changed if ".indexer." not in n]
    assert all(changed[n] for n in indexer)
    assert sum(changed[n] for n in main) > len(main) // 2
    recs = [r for r in _records(tmp_path) if "loss" in r]
    assert len(recs) == 3
    for r in recs:
        assert {"lm_loss", "indexer_kl", "grad_norm/main", "grad_norm/indexer"} <= set(r)
        assert r["indexer_kl"] > 0 and r["loss"] == pytest.approx(r["lm_loss"] + r["indexer_kl"], rel=1e-5)


def test_pretrain_excludes_the_indexer(tmp_path, dataset_factory):
    model, ds = _model(), dataset_factory()
    model.set_attn_mode("sparse")  # the stage switches to dense
    before = _snapshot(model)
    stages.run("pretrain", model, stages.Stream(ds, 2), _cfg(tmp_path, steps=2))
    assert model.cfg.attn_mode == "dense"
    for n, p in model.named_parameters():
        if ".indexer." in n:
            assert torch.equal(p, before[n]) and not p.requires_grad, n
    assert sum(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".indexer." not in n) > 10
    opt = torch.load(tmp_path / "step_00000002" / "optimizer.pt", weights_only=True)
    n_opt = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_opt == sum(1 for n, _ in model.named_parameters() if ".indexer." not in n)


def test_init_from_resolves_hf_and_run_dirs(tmp_path, dataset_factory):
    model = _model()
    model.save_pretrained(tmp_path / "hf")
    loaded = stages.build_model(init_from=tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    stages.run("pretrain", model, stages.Stream(dataset_factory(), 2), _cfg(tmp_path / "run", steps=1))
    assert stages.resolve_init(tmp_path / "run") == tmp_path / "run" / "step_00000001"
    loaded = stages.build_model(init_from=tmp_path / "run", overrides={"indexer.topk": 4})
    assert loaded.cfg.indexer.topk == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="neither"):
        stages.resolve_init(tmp_path / "nothing")


def test_cli_stages_end_to_end(tmp_path, capsys):
    common = ["--seq-len", "48", "--batch-size", "2", "--synthetic-docs", "3", "--model.indexer.topk=8",
              "--model.n_layers", "2"]
    pre, warm, sparse = tmp_path / "pre", tmp_path / "warm", tmp_path / "sparse"
    assert cli(["pretrain", "--steps", "2", "--out", str(pre), *common]) == 0
    assert cli(["dsa-warmup", "--steps", "2", "--out", str(warm), "--init-from", str(pre), *common]) == 0
    assert cli(["dsa-sparse", "--steps", "2", "--out", str(sparse), "--init-from", str(warm / "final"),
                *common]) == 0
    for run in (pre, warm, sparse):
        cfg = json.loads((run / "final" / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 2 and cfg["index_topk"] == 8
    # stage 1 continued from the pretrained weights and changed only the indexer
    a, b = Transformer.from_pretrained(pre / "final"), Transformer.from_pretrained(warm / "final")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert any(".indexer." in n for n in pa)
    for n in pa:  # bitwise equal outside the indexer: the warm-up started from the pretrained weights
        assert torch.equal(pa[n], pb[n]) == (".indexer." not in n), n
    recs = [r for r in _records(sparse) if "loss" in r]
    assert recs and {"lm_loss", "indexer_kl"} <= set(recs[-1])


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli(["pretrain", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert cli(["dsa-warmup", "--bogus", "1", "--out", str(tmp_path)]) == 2
    assert "'--bogus'" in capsys.readouterr().err
    assert cli(["dsa-sparse", "--model.indexer.topkk=3", "--out", str(tmp_path)]) == 2
    assert "topkk" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["pretrain", "--steps", "x"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    assert cli(["dsa-warmup", "--init-from", str(tmp_path / "missing")]) == 2
    assert "--init-from" in capsys.readouterr().err
