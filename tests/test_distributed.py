"""Scale-out on CPU: two gloo processes (spawned the way torchrun starts them) against one process.

- FSDP2 (with activation checkpointing) gives the single-process loss and gradients;
- DCP checkpoints reshard 2 -> 1 and 1 -> 2 ranks (single-process checkpoints load on 2 ranks too), and
  the optimizer state comes along: the next step matches;
- a two-rank run of `dsv32 pretrain` resumes and equals the one-process run; only rank 0 writes metrics.

Everything two ranks do runs in one launch (`_worker`, a module-scoped fixture); the tests compare its
results with one process.
"""

import json
import os
import random
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_config, scale_weights
from dsv32 import distributed as D
from dsv32.cli import main as cli
from dsv32.model import Trace, Transformer
from dsv32.train import TrainConfig, build_optimizer, checkpoint as train_checkpoint, clip_grads, stages

B, T, WORLD = 4, 24, 2  # T > make_config's top-k 8: sparse attention really selects


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> Transformer:
    torch.manual_seed(0)
    return scale_weights(Transformer(make_config()), std=0.2)


def _batch() -> dict:
    """Every label is a target and every row has the same documents, so each rank's mean loss carries
    the same weight: the mean over ranks equals the mean over the whole batch."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (B, T + 1), generator=g)
    docs = (torch.arange(T) >= 10).long().expand(B, T)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": docs}


def _optimizer(model):
    return build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1), stages.STAGES["dsa-sparse"].groups())


def _step(model, optimizer, batch) -> None:
    """One stage-2 step: LM loss + indexer KL, groups clipped apart (DTensor gradients under FSDP)."""
    model.set_attn_mode("sparse")
    loss, _ = stages.sparse_loss(model, batch)
    loss.backward()
    clip_grads(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _adam_state(model, optimizer) -> dict:
    """exp_avg per parameter name, unsharded (a collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        s = optimizer.state.get(p)
        if s:
            t = s["exp_avg"]
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


# -- process launch --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, args) -> None:
    # The environment torchrun gives each process; dsv32.distributed.init() reads it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    with D.session() as ctx:
        assert ctx.world_size == WORLD and ctx.rank == rank
        fn(ctx, *args)
    # The work is done and the group left. Interpreter teardown is skipped: there, gloo's C++ threads once
    # aborted a finished worker in CI (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, out: Path, timeout_s: float = 300.0) -> None:
    """Run fn(ctx, out) on WORLD fresh processes; a worker's exception fails the test with its traceback.

    A worker killed by a signal (not a Python error) gets one relaunch, on a clean `out` (what the failed
    launch wrote there is removed): a second death fails the test.
    """
    before = set(out.iterdir())
    for attempt in (1, 2):
        try:
            return _launch(fn, out, timeout_s)
        except mp.ProcessExitedException as e:
            if attempt == 2 or e.signal_name is None:
                raise
            warnings.warn(f"relaunching the {WORLD} workers: {e}", stacklevel=2)
            for path in set(out.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _launch(fn, out: Path, timeout_s: float) -> None:
    procs = mp.start_processes(_entry, args=(fn, _free_port(), (out,)), nprocs=WORLD, start_method="spawn",
                               join=False)
    deadline = time.monotonic() + timeout_s
    while not procs.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
            pytest.fail(f"the {WORLD} worker processes did not finish within {timeout_s:.0f} s (a collective hung?)")


# -- the two-process session: everything two ranks do, in one launch ------------------------------


STAGES = {"dsa-sparse": stages.sparse_loss, "dsa-warmup": stages.indexer_kl_loss}
CLI_ARGS = ["--seq-len", "32", "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2"]
_build_dataset = stages.build_dataset


def _dataset(seq_len: int, seed: int = 0, **_):
    """Synthetic documents only: the natural corpus (docstrings of standard-library modules and their
    members) changes with the modules a process happens to have imported, so two processes would differ."""
    return _build_dataset(seq_len, seed, n_synthetic=16, max_natural=0)


def _grads(ctx, stage: str, ac: bool) -> dict:
    """Loss and full gradients of one stage's loss on this rank's rows, trainable parameters as in the stage."""
    model = _model()
    build_optimizer(model, TrainConfig(), stages.STAGES[stage].groups())  # sets requires_grad as the stage does
    model.set_attn_mode(stages.STAGES[stage].attn_mode)
    if ctx.enabled:
        D.parallelize(model, ctx, activation_checkpointing=ac)
    loss, _ = STAGES[stage](model, ctx.shard(_batch()))
    loss.backward()
    grads = {n: (p.grad.full_tensor() if ctx.enabled else p.grad) for n, p in model.named_parameters()
             if p.grad is not None}
    return {"loss": ctx.mean({"loss": loss.item()})["loss"], "grads": grads}


def _one_process_checkpoints(out: Path) -> dict:
    """Before the launch: a model two steps in, saved as DCP and in the single-process format."""
    model = _model()
    optimizer = _optimizer(model)
    for _ in range(2):
        _step(model, optimizer, _batch())
    D.save_dcp(out / "one_dcp", model, optimizer)
    train_checkpoint.save(out / "one_legacy", 2, model, optimizer, {}, train_checkpoint.rng_state(), {})
    expected = {"weights2": {k: v.clone() for k, v in model.state_dict().items()},
                "adam2": _adam_state(model, optimizer)}
    _step(model, optimizer, _batch())
    return {**expected, "weights3": model.state_dict()}


def _worker(ctx, out: Path) -> None:
    got = {"grads": {stage: _grads(ctx, stage, ac=True) for stage in STAGES}}
    batch = ctx.shard(_batch())

    # Two steps on two ranks; DCP checkpoint after the first, consolidated export, RL-style replica.
    model = D.parallelize(_model(), ctx)
    assert D.is_sharded(model)
    optimizer = _optimizer(model)
    _step(model, optimizer, batch)
    D.checkpoint.save(out / "run", 1, model, optimizer, {"cursor": 1}, train_checkpoint.rng_state(), {"lr": 1e-2})
    D.export_hf(model, out / "hf")
    got["weights1"] = D.full_state_dict(model)
    replica = Transformer(make_config())
    D.copy_weights(model, replica)
    got["replica_ok"] = all(torch.equal(replica.state_dict()[k], v) for k, v in got["weights1"].items())
    _step(model, optimizer, batch)
    got["weights2"] = D.full_state_dict(model)

    # The one-process checkpoints (DCP and single-process format) loaded on two ranks, then step 3.
    for name, path in (("dcp", out / "one_dcp"), ("legacy", out / "one_legacy" / "step_00000002")):
        model = D.parallelize(Transformer(make_config()), ctx)
        optimizer = _optimizer(model)
        if name == "dcp":
            D.load_dcp(path, model, optimizer)
        else:
            D.restore(train_checkpoint.load(path), model, optimizer)
        loaded, adam = D.full_state_dict(model), _adam_state(model, optimizer)
        _step(model, optimizer, batch)
        got[f"load_{name}"] = {"loaded": loaded, "adam": adam, "weights3": D.full_state_dict(model)}

    # FSDP2 bf16 mixed precision: the router and the indexer still compute with fp32 weights.
    model = D.parallelize(_model(), ctx, mp_policy=D.bf16_policy()).set_attn_mode("sparse")
    seen = {}
    def record(module, args):  # the weight each module computes with
        seen.setdefault(names[module], module.weight.dtype)

    names = {model.get_submodule(n): n for n in ("layers.1.ffn.gate", "layers.1.attn.wq_a")}
    for module in names:
        module.register_forward_pre_hook(record)
    indexer = model.get_submodule("layers.1.attn.indexer")
    fsdp_keys = indexer.keys

    def keys(*args):  # the index keys come out in the dtype the indexer computed in
        out = fsdp_keys(*args)
        seen.setdefault("layers.1.attn.indexer", out[0].dtype)
        return out

    indexer.keys = keys
    loss, _ = stages.sparse_loss(model, batch)
    loss.backward()
    got["bf16"] = {"loss": ctx.mean({"loss": loss.item()})["loss"], "weight_dtypes": seen,
                   "finite": all(bool(torch.isfinite(p.grad.full_tensor()).all()) for p in model.parameters()
                                 if p.grad is not None)}

    # `dsv32 pretrain` on two ranks, stopped after 2 steps and resumed to 4.
    stages.build_dataset = _dataset  # what the command packs (this process only)
    assert cli(["pretrain", *CLI_ARGS, "--steps", "2", "--out", str(out / "cli")]) == 0
    assert cli(["pretrain", *CLI_ARGS, "--steps", "4", "--out", str(out / "cli")]) == 0
    if ctx.is_main:
        torch.save(got, out / "rank0.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    expected = _one_process_checkpoints(out)
    _spawn(_worker, out)
    return out, torch.load(out / "rank0.pt", weights_only=False), expected


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(STAGES))
def test_fsdp_loss_and_grads_equal_one_process(two_ranks, stage):
    _, got, _ = two_ranks
    ref, res = _grads(D.current(), stage, ac=False), got["grads"][stage]
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert set(res["grads"]) == set(ref["grads"])  # the same parameters got gradients
    trained = {".indexer." in n for n in ref["grads"]}
    assert trained == ({True} if stage == "dsa-warmup" else {True, False})  # warm-up: the indexer only
    for n, g in ref["grads"].items():
        torch.testing.assert_close(res["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_export_is_consolidated_and_replicas_match(two_ranks):
    out, got, _ = two_ranks
    assert got["replica_ok"]
    exported = Transformer.from_pretrained(out / "hf")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, got["weights1"][k], rtol=0, atol=0, msg=k)
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_dcp_reshards_two_to_one(two_ranks):
    out, got, _ = two_ranks
    model = Transformer(make_config())
    optimizer = _optimizer(model)
    ckpt = D.checkpoint.load_latest(out / "run")  # the loop's own resume path, without a process group
    assert ckpt.step == 1 and ckpt.data == {"cursor": 1} and D.checkpoint.is_dcp(ckpt.path)
    D.restore(ckpt, model, optimizer)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, got["weights1"][k], rtol=0, atol=0, msg=k)
    _step(model, optimizer, _batch())  # equals the two-rank step 2 only if the optimizer state came along
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, got["weights2"][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("fmt", ["dcp", "legacy"])
def test_one_process_checkpoints_load_on_two_ranks(two_ranks, fmt):
    _, got, expected = two_ranks
    found = got[f"load_{fmt}"]
    for k, v in expected["weights2"].items():
        torch.testing.assert_close(found["loaded"][k], v, rtol=0, atol=0, msg=k)
    assert set(found["adam"]) == set(expected["adam2"])  # no state invented for gradient-free parameters
    for k, v in expected["adam2"].items():
        torch.testing.assert_close(found["adam"][k], v, rtol=0, atol=0, msg=k)
    for k, v in expected["weights3"].items():
        torch.testing.assert_close(found["weights3"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_mixed_precision_keeps_router_and_indexer_fp32(two_ranks):
    _, got, _ = two_ranks
    fp32_loss = _grads(D.current(), "dsa-sparse", ac=False)["loss"]
    assert got["bf16"]["finite"] and got["bf16"]["loss"] == pytest.approx(fp32_loss, rel=0.05)
    assert got["bf16"]["weight_dtypes"] == {"layers.1.ffn.gate": torch.float32, "layers.1.attn.indexer": torch.float32,
                                            "layers.1.attn.wq_a": torch.bfloat16}


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_rank_stage_resumes_and_matches_one_process(two_ranks, tmp_path):
    out, _, _ = two_ranks
    two = out / "cli"
    # One process, built as `dsv32 pretrain` builds it from the same flags, each global batch of 4 rows
    # taken as two micro-batches of 2 (the halves the two ranks hold): the ranks' averaged gradient.
    random.seed(0)
    torch.manual_seed(0)
    model = stages.build_model("tiny")
    cfg = TrainConfig(lr=stages.STAGES["pretrain"].lr, steps=4, batch_size=2, grad_accum=2, seq_len=32,
                      warmup_steps=2, log_every=1, out_dir=str(tmp_path))
    stages.run("pretrain", model, stages.Stream(_dataset(32, 0), 2), cfg)

    records = (two / "metrics.jsonl").read_text().splitlines()
    assert sum("resumed_from" in r for r in records) == 1 and len(_losses(two)) == 4  # rank 0 wrote, once
    assert D.checkpoint.is_dcp(two / "step_00000004")
    assert _losses(two) == pytest.approx(_losses(tmp_path), rel=1e-4)
    exported = Transformer.from_pretrained(two / "final")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=1e-3, atol=1e-5, msg=k)
    # --init-from a torchrun run directory: its newest DCP step, rebuilt as a plain model.
    rebuilt = stages.build_model(init_from=two)
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, rtol=0, atol=0, msg=k)


# -- one process -------------------------------------------------------------------------------------


def test_activation_checkpointing_changes_nothing_but_memory():
    batch = _batch()
    runs = []
    for ac in (False, True):
        model = _model().set_attn_mode("sparse")
        if ac:
            D.apply_ac(model)
            D.apply_ac(model)  # idempotent
        trace = Trace(indexer_kl=[])
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"], trace=trace)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        (loss + torch.stack(trace.indexer_kl).mean()).backward()
        assert len(trace.indexer_kl) == len(trace.routes) == len(trace.topk) == model.cfg.n_layers  # not re-recorded
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = runs
    assert loss0 == loss1 and set(g0) == set(g1)
    assert any(".indexer." in n for n in g1)  # the KL left the checkpointed block through the trace
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)


def test_context_shards_and_errors(monkeypatch, tmp_path):
    batch = _batch()
    part = D.DistContext(rank=1, world_size=2).shard({**batch, "note": "kept"})
    assert torch.equal(part["input_ids"], batch["input_ids"][2:]) and part["note"] == "kept"
    assert D.current().shard(batch) is batch  # single process: untouched
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        D.DistContext(rank=0, world_size=3).shard(batch)
    with pytest.raises(ValueError, match="not a distributed checkpoint"):
        D.load_dcp(tmp_path, Transformer(make_config()))
    from dsv32.distributed import parallel
    from dsv32.train import train

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started us, but nobody joined the group
    with pytest.raises(ValueError, match="never joined the process group"):
        train(Transformer(make_config()), stages.Stream(None, 1), TrainConfig(out_dir=str(tmp_path)))
    monkeypatch.setattr(parallel, "_current", D.DistContext(rank=0, world_size=2))
    with pytest.raises(ValueError, match="unsharded model"):
        train(Transformer(make_config()), stages.Stream(None, 1), TrainConfig(out_dir=str(tmp_path)))
    assert not (tmp_path / "metrics.jsonl").exists()
