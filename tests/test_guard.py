"""Divergence guard (rl-distill-anchors.md §6.1 item 8, §6.5 items 11–14): detectors, rollback, cap, state."""

import math
import random

import pytest
import torch
import torch.nn as nn

from dsv32.rl.guard import ALARMS, DivergenceGuard, GuardConfig
from dsv32.train import checkpoint


class Recorder:
    """The trainer's side of the callbacks: which steps were saved and restored, and what was logged."""

    def __init__(self):
        self.saved, self.restored, self.logs = [], [], []

    def save(self, step):
        self.saved.append(step)

    def restore(self, step):
        self.restored.append(step)

    def log(self, step, values):
        self.logs.append((step, values))


def make_guard(evaluate=None, **cfg):
    rec = Recorder()
    sets = {"a": list(range(40)), "b": list(range(100, 130))}
    evaluate = evaluate or (lambda name, items: 0.5)
    guard = DivergenceGuard(GuardConfig(**{"eval_every": 5, "eval_subset": 10, **cfg}), sets, evaluate,
                            save=rec.save, restore=rec.restore, log=rec.log)
    return guard, rec


def healthy(**kw):
    return {"loss": 0.1, "grad_norm": 1.0, "kl": 0.01, "entropy": 1.0, "reward/mean": 0.3,
            "completions/mean_length": 20.0, "completions/clipped_ratio": 0.0, **kw}


def test_rotating_subsets_walk_through_every_set():
    seen = {"a": [], "b": []}
    guard, _ = make_guard(lambda name, items: seen[name].append(items) or 0.5, eval_subset=12)
    for i in range(4):
        guard.run_eval(i)
    assert [len(x) for x in seen["a"]] == [12] * 4
    assert seen["a"][3] == list(range(36, 40)) + list(range(8))    # wraps around the end of the set
    assert set(sum(seen["a"], [])) == set(range(40))                # 4 windows cover set a
    assert seen["a"][0] != seen["a"][1] and seen["b"][0] == list(range(100, 112))
    again, _ = make_guard(eval_subset=12)
    assert again.subset("a", 3) == seen["a"][3]                     # deterministic


def test_start_saves_the_first_good_checkpoint_and_logs_safeguard_metrics():
    guard, rec = make_guard()
    d = guard.start(0)
    assert d.evaluated and d.saved and rec.saved == [0] and guard.good["step"] == 0
    keys = set().union(*(v for _, v in rec.logs))
    assert {"eval/a/acc", "eval/b/acc", "eval/mean", "safeguard/rollbacks", "safeguard/current_lr_scale"} <= keys
    assert {f"safeguard/alarm/{a}" for a in ALARMS} <= keys


@pytest.mark.parametrize("bad", [{"loss": math.nan}, {"grad_norm": math.inf}, {"kl": math.nan},
                                 {"reward/mean": math.inf}])
def test_nonfinite_rolls_back_at_once(bad):
    guard, rec = make_guard()
    guard.start(0)
    for step in range(1, 3):
        assert not guard.observe(step, healthy()).alarms
    d = guard.observe(3, healthy(**bad))
    assert d.alarms == ["nonfinite"] and d.rolled_back and d.restored_step == 0 and rec.restored == [0]
    assert guard.lr_scale == 0.5 and guard.rollbacks == 1


def test_entropy_floor_needs_patience():
    guard, rec = make_guard(entropy_floor=0.2, patience=2)
    guard.start(0)
    assert not guard.observe(1, healthy(entropy=0.1)).alarms       # one low step: noise
    assert not guard.observe(2, healthy(entropy=0.5)).alarms       # resets the count
    assert not guard.observe(3, healthy(entropy=0.1)).alarms
    d = guard.observe(4, healthy(entropy=0.05))
    assert d.alarms == ["entropy_floor"] and d.rolled_back


def test_kl_spike_relative_to_running_median_and_absolute():
    guard, _ = make_guard(kl_spike_factor=10.0, warmup=3)
    guard.start(0)
    for step, kl in enumerate([0.01, 0.012, 0.011, 0.05], start=1):
        assert not guard.observe(step, healthy(kl=kl)).alarms
    assert guard.observe(5 + 1, healthy(kl=0.5)).alarms == ["kl_spike"]
    guard, _ = make_guard(kl_max=0.1, kl_spike_factor=None)
    guard.start(0)
    assert guard.observe(1, healthy(kl=0.2)).alarms == ["kl_spike"]


def test_length_explosion_and_clipped_ratio():
    guard, _ = make_guard(length_factor=2.0, warmup=2, clipped_ratio_max=0.3)
    guard.start(0)
    assert not guard.observe(1, healthy(**{"completions/mean_length": 20.0})).alarms
    assert not guard.observe(2, healthy(**{"completions/mean_length": 22.0})).alarms
    assert not guard.observe(3, healthy(**{"completions/mean_length": 40.0})).alarms
    assert guard.observe(4, healthy(**{"completions/mean_length": 43.0})).alarms == ["length"]
    guard, _ = make_guard(clipped_ratio_max=0.3)
    guard.start(0)
    assert guard.observe(1, healthy(**{"completions/clipped_ratio": 0.5})).alarms == ["length"]


def test_eval_drop_beyond_tolerance_rolls_back_to_the_best_good_step():
    accs = iter([0.50, 0.50, 0.60, 0.60, 0.57, 0.57, 0.40, 0.40])   # pairs: sets a and b per evaluation
    guard, rec = make_guard(lambda name, items: next(accs), tolerance=0.05)
    guard.start(0)
    for step in range(1, 16):
        d = guard.observe(step, healthy())
        if step == 5:
            assert d.saved and guard.best["eval_mean"] == pytest.approx(0.6)
        if step == 10:                                            # 0.57: within tolerance, still good
            assert not d.alarms and d.saved
        if step == 15:
            assert d.alarms == ["eval_drop"] and d.restored_step == 10
    assert rec.saved == [0, 5, 10] and rec.restored == [10]


def test_hacking_fires_when_train_reward_rises_while_eval_falls():
    evals = iter([0.5] * 4 + [0.45] * 2)
    guard, _ = make_guard(lambda n, i: next(evals), tolerance=0.5)       # the drop alone is within tolerance
    guard.start(0)
    for step in range(1, 11):
        d = guard.observe(step, healthy(**{"reward/mean": 0.2 + 0.05 * step}))
    assert d.alarms == ["hacking"] and d.rolled_back and guard.fired["hacking"] == 1
    # The same eval fall with a flat train reward is not hacking.
    evals = iter([0.5] * 4 + [0.45] * 2)
    guard, _ = make_guard(lambda n, i: next(evals), tolerance=0.5)
    guard.start(0)
    for step in range(1, 11):
        d = guard.observe(step, healthy())
    assert not d.alarms


def test_rollbacks_are_capped_then_the_run_stops_on_good_weights():
    guard, rec = make_guard(max_rollbacks=2, lr_gamma=0.5, beta_factor=2.0)
    guard.start(0)
    for i in range(2):
        d = guard.observe(1, healthy(loss=math.nan))
        assert d.rolled_back and not d.stop
    d = guard.observe(1, healthy(loss=math.nan))
    assert d.stop and not d.rolled_back and d.restored_step == 0
    assert guard.rollbacks == 2 and guard.lr_scale == 0.25 and guard.beta_scale == 4.0 and rec.restored == [0, 0, 0]


def test_guard_state_round_trip():
    guard, _ = make_guard(entropy_floor=0.2)
    guard.start(0)
    for step in range(1, 8):
        guard.observe(step, healthy(entropy=0.1 if step == 7 else 1.0))
    clone, _ = make_guard(entropy_floor=0.2)
    clone.load_state_dict(guard.state_dict())
    assert clone.state_dict() == guard.state_dict()
    assert guard.observe(8, healthy(entropy=0.1)).alarms == clone.observe(8, healthy(entropy=0.1)).alarms == \
        ["entropy_floor"]


def test_bad_config_and_sets():
    with pytest.raises(ValueError, match="lr_gamma"):
        GuardConfig(lr_gamma=0)
    with pytest.raises(ValueError, match="held-out"):
        DivergenceGuard(GuardConfig(), {"a": []}, lambda n, i: 0.0, save=print, restore=print)


# ---------------------------------------------------------------- rollback restores the exact state

class Cursor:
    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_rollback_round_trip_restores_weights_optimizer_rng_and_cursor(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cursor = Cursor()

    def train_step():
        x = torch.randn(8, 4)                         # draws from the torch RNG: a restore must rewind it
        cursor.pos += 1 + random.randrange(3)         # and the Python RNG
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def save(step):
        checkpoint.save(tmp_path, step, model, opt, cursor.state_dict(), checkpoint.rng_state(), {}, keep=2)

    def restore(step):
        ck = checkpoint.load(tmp_path / f"step_{step:08d}")
        ck.load_model(model)
        opt.load_state_dict(ck.optimizer)
        cursor.load_state_dict(ck.data)
        checkpoint.set_rng_state(ck.rng)

    guard = DivergenceGuard(GuardConfig(eval_every=3, eval_subset=0), {"a": [0], "b": [1]},
                            lambda n, i: 1.0, save=save, restore=restore)
    guard.start(0)
    for step in range(1, 4):
        train_step()
        guard.observe(step, healthy())
    assert guard.good["step"] == 3
    snapshot = ({k: v.clone() for k, v in model.state_dict().items()}, cursor.pos)
    train_step()                                      # what the next step does from the good state ...
    expected_next = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(5, 7):
        train_step()
    d = guard.observe(6, healthy(loss=math.inf))
    assert d.rolled_back and d.restored_step == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot[0].items()) and cursor.pos == snapshot[1]
    train_step()                                      # ... is what it does again after the rollback
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected_next.items())


# ---------------------------------------------------------------- a deliberately hackable reward (§6.5 item 13)

def test_guard_catches_a_length_loving_judge():
    """A one-parameter policy pads its answer with filler with probability p = sigmoid(θ). The train reward
    is a judge that loves length (the hack); held-out accuracy is the chance of an unpadded, correct answer.
    REINFORCE on the judge drives p up; the guard must call it hacking and roll back to better weights."""
    torch.manual_seed(0)
    theta = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    saved = {}

    def evaluate(name, items):
        return float(1 - torch.sigmoid(theta.detach())) * (0.9 if name == "a" else 0.8)

    def restore(step):
        with torch.no_grad():
            theta.copy_(saved[step])

    guard = DivergenceGuard(GuardConfig(eval_every=5, eval_subset=0, tolerance=0.5, hack_reward_rise=0.05,
                                        hack_eval_drop=0.02, max_rollbacks=1),
                            {"a": [0], "b": [1]}, evaluate, save=lambda s: saved.update({s: theta.detach().clone()}),
                            restore=restore)
    start = guard.start(0).eval["mean"]
    for step in range(1, 40):
        p = torch.sigmoid(theta)
        pads = torch.bernoulli(p.detach().expand(64))
        reward = pads * 1.0 + (1 - pads) * 0.2                              # the judge prefers the long answer
        logp = torch.where(pads.bool(), torch.log(p), torch.log(1 - p))
        (-(reward - reward.mean()) * logp).mean().backward()
        for g in opt.param_groups:
            g["lr"] = 0.5 * guard.lr_scale
        opt.step()
        opt.zero_grad()
        d = guard.observe(step, healthy(**{"reward/mean": float(reward.mean())}))
        if d.stop:
            break
    assert guard.fired["hacking"] >= 2 and guard.rollbacks == 1 and d.stop
    final = (evaluate("a", [0]) + evaluate("b", [1])) / 2          # the weights the run ends with
    assert final >= start - 1e-6
