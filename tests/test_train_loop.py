"""The generic training loop: learning, parameter groups, per-group clipping, exact resume, checkpoint safety."""

import json
import shutil

import pytest
import torch

from conftest import make_config
from dsv32.model import Transformer
from dsv32.train import ParamGroup, TrainConfig, build_optimizer, clip_grads, load_latest, lm_loss, lr_factor, train
from dsv32.train import checkpoint

V = 97


class Batches:
    """Random tokens; labels[t] = (input_ids[t] + 1) % V (learnable), a few -100. Batch i depends only on i."""

    def __init__(self, B=4, T=24, seed=0):
        self.B, self.T, self.seed, self.i, self.served = B, T, seed, 0, []

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
        x = torch.randint(0, V, (self.B, self.T), generator=g)
        y = (x + 1) % V
        y[:, :2] = -100
        self.served.append(self.i)
        self.i += 1
        return {"input_ids": x, "labels": y}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def model_():
    torch.manual_seed(0)
    return Transformer(make_config())


def cfg_(tmp_path, **kw):
    base = dict(lr=3e-3, warmup_steps=2, steps=30, weight_decay=0.1, log_every=5, out_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=1.5)


def test_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(warmup_steps=4, steps=20, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(20, cfg) == pytest.approx(0.1)


def test_loss_falls_and_metrics_are_jsonl(tmp_path):
    cfg = cfg_(tmp_path)
    summary = train(model_(), Batches(), cfg, groups=[ParamGroup("main")])
    losses = summary["losses"]
    assert summary["steps"] == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert {"loss", "lr", "grad_norm/main", "tokens_per_s"} <= r.keys()
    assert records[-1]["loss"] == pytest.approx(losses[-1])
    assert load_latest(cfg.out_dir).step == 30  # the final checkpoint


def test_lr_zero_group_and_excluded_params_do_not_change(tmp_path):
    model = model_()
    before = snapshot(model)
    groups = [ParamGroup("attn", lambda n: ".attn." in n, lr_mult=0.0), ParamGroup("main")]
    train(model, Batches(), cfg_(tmp_path, steps=3), groups=groups)
    for n, p in model.named_parameters():
        if ".attn." in n:
            assert torch.equal(p, before[n]), n
    for n in ("embed.weight", "head.weight", "layers.0.ffn.w1.weight", "layers.1.ffn.w1", "norm.weight"):
        assert not torch.equal(dict(model.named_parameters())[n], before[n]), n

    model = model_()
    before = snapshot(model)
    train(model, Batches(), cfg_(tmp_path / "b", steps=3), groups=[ParamGroup("head", lambda n: n.startswith("head."))])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n != "head.weight"), n


def test_per_group_clipping_caps_each_group():
    model = model_()
    groups = [ParamGroup("embed", lambda n: n.startswith("embed."), max_grad_norm=1e-3),
              ParamGroup("main", max_grad_norm=1e6)]
    opt = build_optimizer(model, TrainConfig(), groups)
    b = next(Batches())
    (lm_loss(model, b) * 100).backward()
    embed = [p for n, p in model.named_parameters() if n.startswith("embed.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("embed.")]
    rest_grads = [p.grad.clone() for p in rest if p.grad is not None]
    norms = clip_grads(opt)
    assert norms["embed"] > 1e-2  # so the cap below really acted
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in embed]))
    assert after <= 1e-3 * 1.001
    assert norms["main"] < 1e6
    assert all(torch.equal(g, p.grad) for g, p in zip(rest_grads, [p for p in rest if p.grad is not None]))


def test_resume_equals_straight_run(tmp_path):
    groups = lambda: [ParamGroup("attn", lambda n: ".attn." in n, max_grad_norm=0.5), ParamGroup("main")]
    straight_model, straight_data = model_(), Batches()
    cfg = cfg_(tmp_path / "a", steps=6, grad_accum=2, log_every=1)
    train(straight_model, straight_data, cfg, groups=groups())

    cfg_b = cfg_(tmp_path / "b", steps=6, grad_accum=2, log_every=1)
    first_data = Batches()
    out = train(model_(), first_data, cfg_b, groups=groups(), on_step=lambda s, logs: s == 3)
    assert out["steps"] == 3 and load_latest(cfg_b.out_dir).step == 3
    torch.manual_seed(123)  # a different init and RNG: the checkpoint must restore both
    resumed_model, second_data = Transformer(make_config()), Batches()
    out = train(resumed_model, second_data, cfg_b, groups=groups())
    assert out["steps"] == 6 and out["steps_this_run"] == 3

    assert first_data.served + second_data.served == straight_data.served == list(range(12))
    for (n, p), q in zip(straight_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_interrupted_or_corrupt_checkpoints(tmp_path):
    cfg = cfg_(tmp_path, steps=2, ckpt_every=1)
    train(model_(), Batches(), cfg)
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step_00000002"
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000001", "step_00000002"]

    # A write interrupted before the rename: a temp folder with a partial checkpoint is ignored.
    tmp = run / ".tmp-step_00000003-abc"
    shutil.copytree(run / "step_00000002", tmp)
    (tmp / "trainer.json").unlink()
    (tmp / "optimizer.pt").write_bytes(b"\x00" * 10)
    ckpt = load_latest(run)
    assert ckpt.step == 2 and ckpt.data == {"i": 2}

    # A newer complete-looking folder with a truncated optimizer.pt: a ValueError names the file.
    bad = run / "step_00000004"
    shutil.copytree(run / "step_00000002", bad)
    data = (bad / "optimizer.pt").read_bytes()
    (bad / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"step_00000004.*optimizer\.pt.*delete the folder"):
        load_latest(run)
    with pytest.raises(ValueError, match="optimizer.pt"):
        train(model_(), Batches(), cfg)
    (bad / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="optimizer.pt is missing"):
        load_latest(run)
    shutil.rmtree(bad)
    assert load_latest(run).step == 2


def test_bf16_autocast_runs(tmp_path):
    out = train(model_(), Batches(), cfg_(tmp_path, steps=2, bf16=True), resume=False)
    assert out["steps"] == 2 and torch.isfinite(torch.tensor(out["final_loss"]))
