"""The GRPO trainer on a micro model: Keep Sampling Mask and Keep Routing replay (§6.5 item 6), ratio 1 on the
first minibatch (item 5), the tool loop's token layout, exact resume and guard rollback (item 11), the CLI."""

import json

import pytest
import torch

from dsv32.data.tokenizer import ByteTokenizer
from dsv32.model import Transformer
from dsv32.rl import tasks as T
from dsv32.rl.presets import RLConfig, get
from dsv32.rl.rollout import Sample, collate, rollout, task_prompt
from dsv32.rl.trainer import GRPOTrainer, policy_logprobs, token_advantages
from dsv32.serve.engine import Completion, Engine
from dsv32.serve.sampling import SamplingParams

from conftest import make_config, scale_weights

TOK = ByteTokenizer()


def micro_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(make_config(vocab_size=288, n_layers=2))


def micro_cfg(**kw) -> RLConfig:
    # length_judge varies with every random completion, so groups have non-zero advantages.
    base = dict(prompts_per_step=2, group_size=3, max_tokens=8, eval_n=4, steps=2, thinking=False,
                rubric={"*": {"length_judge": 1.0, "format": 0.1}}, n_train_tasks=20, ckpt_every=1, warmup_steps=0,
                ema=0.0)
    return get("tiny-math").replace(**{**base, **kw})


def test_keep_sampling_mask_and_routing_replay_reproduce_the_sampler():
    model = scale_weights(micro_model(), std=0.2)
    engine = Engine(model, max_batch=8, eos_id=TOK.eos_id)
    params = SamplingParams(temperature=0.8, top_p=0.7, max_tokens=12, logprobs=True, return_kept=True,
                            return_routes=True)
    torch.manual_seed(1)
    samples = rollout(engine, TOK, T.make_tasks("math", 2), group_size=3, params=params, thinking=True)
    batch = collate(samples, model.cfg.vocab_size, "cpu", temperature=0.8)
    with torch.no_grad():
        lp, _ = policy_logprobs(model, batch)
        no_mask, _ = policy_logprobs(model, {**batch, "kept": None})
    m = batch["mask"].bool()
    assert (batch["kept"].sum(-1)[m] < model.cfg.vocab_size).any()      # top-p really truncated something
    assert torch.allclose(lp[m], batch["sampler_logps"][m], atol=1e-4)  # replay: the sampler's distribution
    assert (no_mask[m] - batch["sampler_logps"][m]).abs().max() > 1e-2  # no replay: a biased ratio
    # Keep Routing: with the router perturbed, replayed routes still give the sampler's log-probs.
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.ffn, "gate"):
                layer.ffn.gate.bias += torch.randn_like(layer.ffn.gate.bias) * 5
        replay, _ = policy_logprobs(model, batch)
        fresh, _ = policy_logprobs(model, {**batch, "routes": None})
    assert torch.allclose(replay[m], batch["sampler_logps"][m], atol=1e-4)
    assert (fresh[m] - batch["sampler_logps"][m]).abs().max() > 1e-3


class ScriptedEngine:
    """Plays fixed model turns (one list per call) so the tool loop's bookkeeping can be checked exactly."""

    def __init__(self, turns):
        self.turns, self.max_len, self.calls = list(turns), 4096, []

    def generate(self, prompts, params):
        self.calls.append([list(p) for p in prompts])
        text = self.turns.pop(0)
        ids = TOK.encode(text)
        return [Completion(list(p), list(ids), [-0.5] * len(ids), None, None, "stop", False) for p in prompts]


def test_tool_loop_layout_masks_tool_outputs_and_scores_success():
    task = next(t for t in T.make_tasks("tool", 20) if t.meta["calls"][0]["name"] == "calc")
    call = json.dumps(task.meta["calls"][0]["arguments"])
    turn1 = ("need calc</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calc<｜tool▁sep｜>" + call +
             "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>")
    turn2 = f"so {task.answer}</think>{task.answer}<｜end▁of▁sentence｜>"
    engine = ScriptedEngine([turn1, turn2])
    params = SamplingParams(max_tokens=200, logprobs=True)
    [s] = rollout(engine, TOK, [task], group_size=1, params=params, thinking=True)
    prompt = task_prompt(task, TOK, True)
    outputs = ("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" + task.answer +
               "<｜tool▁output▁end｜><｜tool▁outputs▁end｜><｜Assistant｜><think>")
    expected = TOK.decode(prompt) + turn1 + outputs + turn2
    assert TOK.decode(s.ids) == expected and s.turns == 2
    assert engine.calls[1][0] == s.ids[: len(s.ids) - len(TOK.encode(turn2))]   # turn 2 saw the tool output
    generated = TOK.decode([t for t, g in zip(s.ids, s.gen_mask) if g])
    assert generated == turn1 + turn2                                             # tool output and opener: mask 0
    assert [lp for lp, g in zip(s.sampler_logps, s.gen_mask) if g] == [-0.5] * s.n_generated
    assert s.transcript[2] == {"role": "tool", "tool_call_id": "call_0", "content": task.answer}
    from dsv32.rl.rewards import tool_success
    from dsv32.rl.trainer import success
    assert success(s) and tool_success(s.text, task, transcript=s.transcript) == 1.0


def test_first_minibatch_ratio_is_one_and_the_policy_moves(tmp_path):
    model = micro_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(model, micro_cfg(minibatches=1, top_p=0.9), tmp_path)
    torch.manual_seed(0)
    logs = trainer.train_step()
    assert logs["num_samples_trained"] > 0 and logs["frac_reward_zero_std"] < 1
    assert logs["is/ratio_mean"] == 1.0 and logs["is/ratio_max"] == 1.0 and logs["clip_ratio/region_mean"] == 0
    assert logs["grad_norm"] > 0 and abs(logs["mismatch/kl"]) < 1e-3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for key in ("reward/mean", "rewards/length_judge/mean", "rewards/math/format/mean", "completions/clipped_ratio",
                "entropy", "policy_loss", "lr", "step_time"):
        assert key in logs, key


def test_kl_to_a_frozen_reference_and_opsm_with_two_minibatches(tmp_path):
    cfg = micro_cfg(minibatches=2, **{"loss.beta": 0.05, "loss.opsm_delta": 0.0}, beta_by_domain={})
    trainer = GRPOTrainer(micro_model(), cfg, tmp_path)
    assert trainer.ref is not None and not any(p.requires_grad for p in trainer.ref.parameters())
    torch.manual_seed(0)
    trainer.train_step()
    logs = trainer.train_step()
    assert logs["kl"] > 0 and "opsm/masked_frac" in logs
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    trainer.train_step()
    assert all(torch.equal(ref_before[k], v) for k, v in trainer.ref.state_dict().items())   # frozen


def _run(out, steps, resume=True, **kw):
    trainer = GRPOTrainer(micro_model(), micro_cfg(steps=steps, **kw), out)
    return trainer, trainer.train(resume=resume, progress=False)


def test_resume_is_exact(tmp_path):
    straight, _ = _run(tmp_path / "a", 3)
    _run(tmp_path / "b", 2)
    resumed, summary = _run(tmp_path / "b", 3)
    assert summary["steps"] == 3 and resumed.cursor == straight.cursor
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_ema_is_the_run_model_and_resumes_exactly(tmp_path, monkeypatch):
    policies = []   # the policy's weights at the start and after every step
    step = GRPOTrainer.train_step

    def recording(self):
        if not policies:
            policies.append({k: v.clone() for k, v in self.model.state_dict().items()})
        logs = step(self)
        policies.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return logs

    monkeypatch.setattr(GRPOTrainer, "train_step", recording)
    straight, summary = _run(tmp_path / "a", 3, ema=0.5, lr=1e-2)
    assert summary["ema"] == 0.5 and 0 <= summary["after_last_policy"] <= 1
    # EMA from the start weights: 0.5^3 θ0 + 0.5^3 θ1 + 0.5^2 θ2 + 0.5 θ3, now the policy and the export.
    final = Transformer.from_pretrained(tmp_path / "a" / "final").state_dict()
    moved = 0.0
    for k, v in straight.model.state_dict().items():
        want = 0.125 * policies[0][k] + 0.125 * policies[1][k] + 0.25 * policies[2][k] + 0.5 * policies[3][k]
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(final[k], v), k
        moved = max(moved, (policies[3][k] - v).abs().max().item())
    assert moved > 1e-3   # the EMA really differs from the last policy
    ckpt = tmp_path / "a" / "ckpt" / "step_00000003"
    assert (ckpt / "ema.safetensors").is_file()
    _run(tmp_path / "b", 2, ema=0.5, lr=1e-2)
    resumed, _ = _run(tmp_path / "b", 3, ema=0.5, lr=1e-2)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    _run(tmp_path / "c", 1)
    with pytest.raises(ValueError, match="no ema.safetensors"):   # a run without an EMA cannot resume with one
        _run(tmp_path / "c", 2, ema=0.5)
    with pytest.raises(ValueError, match=r"RLConfig.ema=1"):
        micro_cfg(ema=1)


def test_guard_rollback_restores_the_good_checkpoint(tmp_path):
    cfg = micro_cfg(steps=6, guard={"eval_every": 2, "eval_subset": 4, "entropy_floor": 100.0, "patience": 3,
                                    "max_rollbacks": 1, "lr_gamma": 0.5, "kl_spike_factor": None,
                                    "clipped_ratio_max": None, "length_factor": None})
    trainer = GRPOTrainer(micro_model(), cfg, tmp_path)
    summary = trainer.train(progress=False)
    g = summary["guard"]
    # Entropy is always below the absurd floor: the alarm fires after `patience` steps, rolls back to the
    # last good evaluation (step 2), fires again, and the cap stops the run on the best good weights.
    assert g["alarms"]["entropy_floor"] == 2 and g["rollbacks"] == 1 and g["lr_scale"] == 0.5
    assert summary["stopped"] == "guard" and trainer.step in trainer.guard.protected_steps()
    good = trainer.out / "good" / f"step_{trainer.step:08d}"
    ref = Transformer.from_pretrained(good).state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("safeguard/alarm/entropy_floor") == 1 for r in logged)
    assert any(r.get("safeguard/rollbacks") == 1 for r in logged)
    again = GRPOTrainer(micro_model(seed=1), cfg, tmp_path).train(progress=False)   # a guard stop is final
    assert again["steps"] == summary["steps"] and again["stopped"] == "guard"


def test_cli_writes_final_model_and_report(tmp_path):
    from dsv32.cli import main

    micro_model().save_pretrained(tmp_path / "base")
    rc = main(["rl", "--preset", "tiny-math", "--init-from", str(tmp_path / "base"), "--out", str(tmp_path / "run"),
               "--steps", "1", "--prompts_per_step=2", "--group_size=2", "--max_tokens=6", "--eval_n=3",
               "--thinking=false"])
    assert rc == 0 and (tmp_path / "run" / "final" / "config.json").is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    r = report["rl"]["tiny-math"]
    assert 0 <= r["before"] <= 1 and 0 <= r["after"] <= 1 and r["steps"] == 1
    assert (tmp_path / "run" / "rl.md").is_file()
    assert main(["rl", "--preset", "tiny-math", "--init-from", str(tmp_path / "base"), "--out", str(tmp_path / "x"),
                 "--loss.aggregation=bogus"]) == 2
    with pytest.raises(ValueError, match="unknown key"):
        get("tiny-math").replace(**{"loss.betta": 0.1})


def test_both_modes_alternate_and_are_evaluated(tmp_path):
    trainer = GRPOTrainer(micro_model(), micro_cfg(thinking="both", prompts_per_step=2), tmp_path)
    tasks = T.make_tasks("math", 2)
    params = SamplingParams(max_tokens=4, logprobs=True)
    samples = rollout(trainer.engine, TOK, tasks, group_size=2, params=params, thinking=[True, False])
    assert [s.thinking for s in samples] == [True, True, False, False]
    assert samples[0].ids[samples[0].prompt_len - 1] == TOK.token_id("<think>")
    assert samples[2].ids[samples[2].prompt_len - 1] == TOK.token_id("</think>")
    logs = trainer.train_step()
    assert "completions/thinking/mean_length" in logs and "completions/non_thinking/mean_length" in logs
    r = trainer.evaluate_heldout()
    assert set(r["modes"]) == {"thinking", "non_thinking"} and r["domains"] is r["modes"]["thinking"]


def test_epochs_reuse_the_rollout_against_the_same_pi_old(tmp_path):
    trainer = GRPOTrainer(micro_model(), micro_cfg(minibatches=1, epochs=2, lr=1e-3), tmp_path)
    torch.manual_seed(0)
    logs = trainer.train_step()
    # Pass 1 has ratio exactly 1; pass 2 sees the policy moved by pass 1, against the stored π_old.
    assert logs["is/ratio_max"] > 1.0 and logs["grad_norm"] > 0


def test_cosine_lr_decay_runs_to_zero_by_the_end(tmp_path):
    """lr_decay="cosine": the learning rate of each step falls from lr towards 0 over `steps` (or the time budget),
    and the optimizer uses the logged value."""
    trainer = GRPOTrainer(micro_model(), micro_cfg(steps=4, lr_decay="cosine", lr=1e-3), tmp_path)
    seen = []
    real_step = trainer.train_step

    def step():
        logs = real_step()
        seen.append((logs["lr"], trainer.optimizer.param_groups[0]["lr"]))
        return logs

    trainer.train_step = step
    trainer.train(resume=False, progress=False)
    lrs = [logged for logged, _ in seen]
    assert all(logged == used for logged, used in seen)
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.2e-3
    with pytest.raises(ValueError, match="lr_decay"):
        micro_cfg(lr_decay="linear")


def test_adam_betas_reach_the_optimizer(tmp_path):
    trainer = GRPOTrainer(micro_model(), micro_cfg(betas=[0.9, 0.999]), tmp_path)
    assert all(g["betas"] == (0.9, 0.999) for g in trainer.optimizer.param_groups)
    assert get("tiny-math").betas == (0.9, 0.95)   # the loop's default, unchanged


def _sample(text, reward, uid=0):
    ids = TOK.encode(text)
    return Sample(uid, T.Task("What is 9+4-9?", "4", "math"), True, [1, 2] + ids, 2, [0, 0] + [1] * len(ids),
                  [0.0] * (len(ids) + 2), text=TOK.decode(ids), reward=reward)


def test_process_supervision_blames_the_wrong_line_and_reaches_the_loss(tmp_path):
    right = _sample("9+4=13\n13-9=4</think>4<｜end▁of▁sentence｜>", 1.0)
    late = _sample("9+4=13\n13-9=5</think>5<｜end▁of▁sentence｜>", 0.0)
    early = _sample("9+4=14\n14-9=5</think>5<｜end▁of▁sentence｜>", 0.0)
    token_advantages([right, late, early], TOK)
    for s in (right, late, early):
        assert len(s.token_adv) == len(s.ids) and s.token_adv[:2] == [0.0, 0.0]   # the prompt carries nothing
    first, second = 2, 2 + len("9+4=13\n")                   # first token of each line
    assert all(a > 0 for a in right.token_adv[2:])
    assert late.token_adv[second] < late.token_adv[first]     # its wrong line is blamed more than its right one
    assert early.token_adv[second] > late.token_adv[second]   # "14-9=5" holds, "13-9=5" does not
    # a tool loop: the first turn's tokens come before every step of the last turn; tool output carries nothing
    call, out, last = TOK.encode("call"), TOK.encode("7"), TOK.encode("9+4=13</think>13")
    ids = [1, 2] + call + out + last
    mask = [0, 0] + [1] * len(call) + [0] * len(out) + [1] * len(last)
    tool = [Sample(0, T.Task("q", "13", "math"), True, ids, 2, mask, [0.0] * len(ids), text=TOK.decode(last),
                   reward=r) for r in (1.0, 0.0)]
    token_advantages(tool, TOK)
    a = tool[0].token_adv
    assert all(x == a[2] for x in a[2:2 + len(call)]) and a[2] == a[2 + len(call) + len(out)]
    assert all(x == 0.0 for x in a[2 + len(call): 2 + len(call) + len(out)])
    batch = collate([right, late], 288, "cpu")
    assert torch.equal(batch["adv"][0, 1:3], torch.tensor(right.token_adv[2:4]))   # shifted like the targets
    trainer = GRPOTrainer(micro_model(), micro_cfg(advantage="process", minibatches=1), tmp_path)
    torch.manual_seed(0)
    logs = trainer.train_step()
    assert logs["num_samples_trained"] > 0 and logs["grad_norm"] > 0 and "process/step_accuracy" in logs
