"""The DSA recipe end to end (`dsv32 dsa-recipe`) at a micro size, and a training command killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv32.train import checkpoint, recipe

MICRO = {"n_layers": 2, "dim": 64, "inter_dim": 128, "moe.moe_inter_dim": 32, "moe.n_dense_layers": 1,
         "mla.n_heads": 2, "mla.q_lora_rank": 32, "mla.kv_lora_rank": 32, "indexer.n_heads": 2,
         "indexer.head_dim": 16, "indexer.topk": 32}


def _micro(**kw) -> recipe.Recipe:
    base = dict(seq_len=320, batch_size=2, pretrain_batch_size=3, pretrain_steps=6, warmup_steps=6, sparse_steps=4, n_synthetic=12,
                induction_steps=3, induction_seq_len=32, induction_batch_size=4, n_copy=8, n_repeat=8,
                digit_steps=2, digit_seq_len=48, digit_batch_size=4, n_digit_copy=4, key_steps=2, key_batch_size=4,
                eval_lengths=(256, 320), eval_n=1, val_rows=2, overrides=MICRO)
    return recipe.Recipe(**{**base, **kw})


def test_recipe_runs_every_stage_reports_and_skips_finished_stages(tmp_path, monkeypatch):
    logs, built = [], []
    build_model = recipe.stages.build_model
    monkeypatch.setattr(recipe.stages, "build_model",
                        lambda *a, **kw: built.append(a[1] if len(a) > 1 else kw.get("init_from")) or build_model(*a, **kw))
    dsa = recipe.run(_micro(), tmp_path, log=logs.append)
    report = json.loads((tmp_path / "report.json").read_text())["dsa"]
    for key in ("recall_stage1", "recall_untrained", "val_loss_dense", "val_loss_sparse", "retrieval", "topk",
                "seq_len"):
        assert key in report, key
    assert report["topk"] == 32 and report["seq_len"] == 320
    assert set(report["retrieval"]) == {"256", "320"}
    for v in report["retrieval"].values():
        assert 0.0 <= v["dense"] <= 1.0 and 0.0 <= v["sparse"] <= 1.0
        assert set(v["tokens"]) == {"passkey", "kv_key"}  # partial credit per kind, beside exact match
        assert all(v["kinds"][k][m] <= v["tokens"][k][m] <= 1.0 for k in v["tokens"] for m in ("dense", "sparse"))
    assert 0.0 < report["recall_untrained"] <= 1.0 and 0.0 < report["recall_stage1"] <= 1.0
    assert report["val_loss_sparse"] > 0 and report["val_loss_dense"] > 0
    assert report["val_loss_sparse"] != report["val_loss_dense"]  # two different models
    assert set(report["checks"]) >= {"recall_stage1_ge_0.90", "val_loss_within_2pct"}
    for name in ("dsa_loss.png", "dsa_indexer.png", "dsa_retrieval.png", "report_dsa.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert set(recipe.STAGE_ORDER) <= set(timeline)
    rows = {s: checkpoint.load_latest(tmp_path / s).config["batch_size"] for s in recipe.STAGE_ORDER}
    assert rows == {"induction": 4, "digits": 4, "keys": 4, "pretrain": 3, "dsa-warmup": 2, "dsa-sparse": 2,
                    "dense-control": 2}
    # The digit phase continues from the induction phase (short rows of repeated strings), pretraining from the
    # digit phase, not from scratch.
    assert built[:4] == [None, tmp_path / "induction" / "final", tmp_path / "digits" / "final",
                         tmp_path / "keys" / "final"]
    assert report["steps"]["induction"] == 3 and report["steps"]["digits"] == 2 and report["steps"]["keys"] == 2

    # Run again: every stage is found finished and only the evaluation runs, with identical results.
    logs.clear()
    again = recipe.run(_micro(), tmp_path, log=logs.append)
    assert sum("done before" in line for line in logs) == len(recipe.STAGE_ORDER)
    assert again["val_loss_sparse"] == dsa["val_loss_sparse"] and again["retrieval"] == dsa["retrieval"]


def test_recipe_without_the_induction_phase_pretrains_from_scratch(tmp_path):
    dsa = recipe.run(_micro(induction_steps=0, digit_steps=0, key_steps=0, pretrain_steps=2, warmup_steps=2,
                            sparse_steps=2, eval_lengths=(320,)),
                     tmp_path, log=lambda line: None)
    assert not any((tmp_path / s).exists() for s in ("induction", "digits", "keys"))
    assert (tmp_path / "pretrain" / "final" / "config.json").is_file()
    assert dsa["steps"]["induction"] == 0 and dsa["seconds"]["induction"] is None
    assert set(dsa["copy_accuracy"]) == {"pretrain"} and 0.0 <= dsa["copy_accuracy"]["pretrain"]["320"] <= 1.0


def test_recipe_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown recipe keys.*'sparse_stpes'"):
        recipe.Recipe.from_dict({"sparse_stpes": 3})


def test_a_run_killed_while_checkpointing_resumes_from_its_last_good_checkpoint(tmp_path):
    """SIGKILL a `dsv32 pretrain` that checkpoints every step, at a moment it is writing: the newest complete
    checkpoint loads, and the same command then finishes from it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsv32", "pretrain", "--steps", "30", "--ckpt-every", "1", "--batch-size", "2",
           "--seq-len", "64", "--synthetic-docs", "0", "--out", str(out), "--log-every", "1",
           *[f"--model.{k}={v}" for k, v in MICRO.items() if k != "indexer.topk"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Kill it right after a checkpoint folder appears: the next one is being written from then on.
    while time.time() < deadline and proc.poll() is None and len(checkpoint.list_checkpoints(out)) < 2:
        time.sleep(0.01)
    while time.time() < deadline and proc.poll() is None and not list(out.glob(".tmp-*")):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    ckpt = checkpoint.load_latest(out)
    assert ckpt is not None and 1 <= ckpt.step < 30
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if "resumed_from" in r]
    assert resumed and Path(resumed[-1]["resumed_from"]).name == f"step_{ckpt.step:08d}"
    assert checkpoint.load_latest(out).step == 30 and (out / "final" / "config.json").is_file()
