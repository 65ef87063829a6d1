"""Distillation (dsv32/distill/): best-of-N verified records that render back to exactly what the specialist
generated, mode flags through SFT, reverse-KL advantages and teacher routing by domain (rl-distill-anchors.md
§6.5 item 15), on-policy distillation steps, and the `dsv32 distill` commands."""

import json

import pytest
import torch

from conftest import make_config, scale_weights
from dsv32.cli import main as cli
from dsv32.data.tokenizer import EOS, ByteTokenizer
from dsv32.distill import generate as G
from dsv32.distill import train as D
from dsv32.model import Transformer
from dsv32.rl import tasks as T
from dsv32.rl.rollout import collate, rollout
from dsv32.serve.engine import Completion
from dsv32.serve.sampling import SamplingParams
from dsv32.train import sft

TOK = ByteTokenizer()
CALLS = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{}<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>" + EOS


class ScriptedEngine:
    """Plays fixed replies: call k of `generate` answers prompt i with replies[k][i]."""

    def __init__(self, replies):
        self.replies, self.max_len = list(replies), 4096

    def generate(self, prompts, params):
        texts = self.replies.pop(0)
        assert len(texts) == len(prompts)
        return [Completion(list(p), TOK.encode(t), [0.0] * len(TOK.encode(t)), None, None, "stop", False)
                for p, t in zip(prompts, texts)]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(make_config(vocab_size=288, n_layers=2, **kw))


def test_best_of_n_keeps_the_best_verified_answer_and_records_render_back_exactly():
    math = T.make_tasks("math", 2)
    a, b = math
    steps = a.solution
    # prompt a: wrong, right with reasoning, right with a longer reasoning -> the shorter right one wins
    # prompt b: nothing verifies -> no record
    replies = [[f"{steps}</think>{int(a.answer) + 1}{EOS}", f"{steps}</think>{a.answer}{EOS}",
                f"{steps}\ncheck {a.answer}</think>{a.answer}{EOS}",
                f"x</think>{int(b.answer) + 1}{EOS}", f"{b.answer}", f"y</think>nope{EOS}"]]
    samples = rollout(ScriptedEngine(replies), TOK, math, group_size=3, params=SamplingParams(), thinking=True)
    records, stats = G.best_of_n(samples, 3, "math", "specialist-math")
    assert stats["prompts"] == 2 and stats["candidates"] == 6 and stats["verified"] == 2
    assert stats["records"] == 1 and stats["prompt_yield"] == 0.5 and stats["duplicates"] == 0
    [rec] = records
    assert rec["mode"] == "thinking" and rec["domain"] == "math" and rec["source_model"] == "specialist-math"
    assert rec["reasoning_content"] == steps and rec["messages"][-1]["content"] == a.answer
    assert rec["verifier_scores"]["correctness"] == 1.0 and rec["verifier_scores"]["total"] > 1.0
    # The record, rendered for SFT, is token for token what the specialist generated, with the same loss mask.
    ex = sft.record_example(json.loads(json.dumps(rec)), TOK)
    best = samples[1]
    assert ex.thinking and ex.ids == best.ids and ex.mask[1:] == best.gen_mask[1:]


def test_non_thinking_records_carry_no_reasoning_and_tool_transcripts_round_trip():
    task = next(t for t in T.make_tasks("tool", 30) if t.meta["calls"][0]["name"] == "lookup")
    call = CALLS.format("lookup", json.dumps(task.meta["calls"][0]["arguments"]))
    # non-thinking: a leaked reasoning block never verifies, even with the right answer
    replies = [[call, f"<think>hm</think>{task.answer}{EOS}", call], [f"{task.answer}{EOS}", f"{task.answer}{EOS}"]]
    samples = rollout(ScriptedEngine(replies), TOK, [task], group_size=3, params=SamplingParams(), thinking=False)
    assert samples[1].truncated is False and not G.verified(samples[1], TOK)
    records, stats = G.best_of_n(samples, 3, "tool", "specialist-tool")
    assert stats["verified"] == 2 and stats["records"] == 1
    [rec] = records
    assert rec["mode"] == "non_thinking" and rec["reasoning_content"] is None
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert all("reasoning_content" not in m for m in rec["messages"]) and rec.get("tools") == T.tools_for(task)
    ex = sft.record_example(json.loads(json.dumps(rec)), TOK)
    assert not ex.thinking and ex.ids == samples[0].ids and ex.mask[1:] == samples[0].gen_mask[1:]
    assert "<think>" not in TOK.decode([t for t, m in zip(ex.ids, ex.mask) if m])


def test_direct_records_fill_missing_non_thinking_answers_without_reasoning():
    a, b = T.make_tasks("math", 2)
    think = [[f"{t.solution}</think>{t.answer}{EOS}" for t in (a, b)]]
    direct = [[f"{b.answer}{EOS}"] * 2]   # prompt a: no direct answer; prompt b: a verified one
    rt, _ = G.best_of_n(rollout(ScriptedEngine(think), TOK, [a, b], group_size=1, params=SamplingParams(),
                                thinking=True), 1, "math", "s")
    rn, _ = G.best_of_n(rollout(ScriptedEngine(direct), TOK, [a, b], group_size=1, params=SamplingParams(),
                                thinking=False), 1, "math", "s")
    assert len(rt) == 2 and len(rn) == 1
    [extra] = G.direct_records(rt + rn)
    assert extra["messages"][0]["content"] == a.prompt and extra["mode"] == "non_thinking"
    assert extra["reasoning_content"] is None and extra["from_mode"] == "thinking"
    assert all("reasoning_content" not in m for m in extra["messages"])
    assert T.verify(a, extra["messages"][-1]["content"])
    ex = sft.record_example(json.loads(json.dumps(extra)), TOK)   # trained as a direct answer: no reasoning
    trained = TOK.decode([t for t, m in zip(ex.ids, ex.mask) if m])
    assert not ex.thinking and trained == a.answer + EOS


def test_negative_records_are_failed_direct_replies_that_render_back_and_train_no_cross_entropy():
    task = next(t for t in T.make_tasks("tool", 30) if t.meta["calls"][0]["name"] == "lookup")
    wrong = CALLS.format("lookup", json.dumps({"name": "Zzz"}))     # -> "no entry for Zzz": off the verified path
    right = CALLS.format("lookup", json.dumps(task.meta["calls"][0]["arguments"]))
    # prompt 1: a leaked block (cannot render back: escaped), then a clean wrong reply; prompt 2: verified only
    replies = [[f"1</think>2{EOS}", wrong, right, right], [f"7{EOS}", f"{task.answer}{EOS}", f"{task.answer}{EOS}"]]
    samples = rollout(ScriptedEngine(replies), TOK, [task, task], group_size=2, params=SamplingParams(),
                      thinking=False)
    negs = G.negative_records(samples, 2, "tool", "specialist-tool", limit=5)
    [neg] = negs
    assert neg["negative"] is True and neg["mode"] == "non_thinking" and neg["reasoning_content"] is None
    assert "no entry for Zzz" in neg["messages"][2]["content"] and not T.verify(task, neg["messages"][-1]["content"])
    ex = sft.record_example(json.loads(json.dumps(neg)), TOK)
    assert not ex.learn and not ex.thinking and ex.ids == samples[1].ids and sum(ex.mask) > 0
    assert G.negative_records(samples, 2, "tool", "s", limit=0) == []
    with pytest.raises(ValueError, match="non-thinking"):
        sft.record_example({**neg, "mode": "thinking"}, TOK)
    # the direct-answer fill ignores negatives: a prompt with only a negative record still gets its fill
    think = {"messages": [{"role": "user", "content": task.prompt},
                          {"role": "assistant", "content": task.answer, "reasoning_content": "r"}],
             "reasoning_content": "r", "mode": "thinking", "domain": "tool"}
    assert len(G.direct_records([think, neg])) == 1


def test_reasoning_ok_checks_every_step_not_only_the_final_answer():
    import doctest

    assert doctest.run_docstring_examples(T.reasoning_ok, vars(T)) is None   # the examples in the docstring
    for domain in ("math", "countdown", "logic", "alignment", "tool"):
        for difficulty in (1, 2, 3):
            for t in T.make_tasks(domain, 20, difficulty=difficulty):
                assert T.reasoning_ok(t, t.solution), (domain, t.prompt, t.solution)   # worked traces pass
    a = T.Task("What is 9+4-9?", "4", "math", {"expr": "9+4-9"})
    for bad in ("9+4=14\n14-9=4",   # a wrong step before a lucky answer
                "9+4=13\n12-9=4",   # not chained
                "9+3=12\n12-8=4",   # true and chained, but not the question's numbers
                "9+4=13", "", None, "9+4=13\n13-9=4\nso 4"):
        assert not T.reasoning_ok(a, bad), bad
    [c] = T.make_tasks("countdown", 1)   # every given number once, ending on the target
    assert T.reasoning_ok(c, c.solution) and not T.reasoning_ok(c, c.solution.split("\n")[0])
    [lg] = T.make_tasks("logic", 1)
    order = lg.meta["order"]
    assert T.reasoning_ok(lg, ">".join(order)) and not T.reasoning_ok(lg, ">".join([order[0]] * len(order)))
    [al] = [t for t in T.make_tasks("alignment", 40) if t.meta["rule"] == "refuse"][:1]
    assert not T.reasoning_ok(al, al.solution.replace("harmful, refuse", "safe, help"))


def test_best_of_n_drops_lucky_traces_when_reasoning_is_checked():
    [a] = T.make_tasks("math", 1)
    first = a.solution.split("\n")[0]
    lucky = first.replace("=", "=1") + "\n" + "\n".join(a.solution.split("\n")[1:])   # first step wrong
    assert not T.reasoning_ok(a, lucky) and T.reasoning_ok(a, a.solution)
    replies = [[f"{lucky}</think>{a.answer}{EOS}", f"{a.solution}</think>{a.answer}{EOS}"]]
    samples = rollout(ScriptedEngine(replies * 2), TOK, [a], group_size=2, params=SamplingParams(), thinking=True)
    records, stats = G.best_of_n(samples, 2, "math", "s", check_reasoning=True)
    assert stats["verified"] == 1 and stats["wrong_reasoning"] == 1
    assert records[0]["reasoning_content"] == a.solution
    loose, st = G.best_of_n(samples, 2, "math", "s")   # unchecked: both count as verified
    assert st["verified"] == 2 and st["wrong_reasoning"] == 0
    samples = rollout(ScriptedEngine([[f"{lucky}</think>{a.answer}{EOS}"] * 2]), TOK, [a], group_size=2,
                      params=SamplingParams(), thinking=True)
    assert G.best_of_n(samples, 2, "math", "s", check_reasoning=True)[0] == []   # only lucky traces: no record


def test_distillation_weights_repeat_a_domains_records():
    ex = [sft.Example([1, 2], [0, 1], d, True) for d in ("math", "tool", "logic")]
    assert [e.domain for e in D.weighted(ex, {"tool": 3, "logic": 0})] == ["math", "tool", "tool", "tool"]
    assert D.weighted(ex, None) == ex
    with pytest.raises(ValueError, match="whole number"):
        D.weighted(ex, {"tool": 1.5})
    assert D.parse_weights(["tool=3", "logic=2"]) == {"tool": 3, "logic": 2}
    with pytest.raises(ValueError, match="DOMAIN=N"):
        D.parse_weights(["tool:3"])


def test_duplicate_prompts_are_dropped():
    [a] = T.make_tasks("logic", 1)
    reply = f"{a.solution}</think>{a.answer}{EOS}"
    samples = rollout(ScriptedEngine([[reply] * 4]), TOK, [a, a], group_size=2, params=SamplingParams(),
                      thinking=True)
    records, stats = G.best_of_n(samples, 2, "logic", "s")
    assert stats["records"] == 1 and stats["duplicates"] == 1 and len(records) == 1


def test_generate_reads_training_prompts_only_and_writes_consistent_stats(tmp_path):
    model = scale_weights(_model(), std=0.05)
    cfg = G.GenerateConfig(prompts=3, samples=2, max_tokens=6, modes=("thinking", "non-thinking"))
    records, stats = G.generate(model, "logic", cfg, "spec")
    assert set(stats) == {"thinking", "non_thinking"}
    for s in stats.values():
        assert s["prompts"] == 3 and s["candidates"] == 6 and s["records"] <= s["prompts"]
    assert len(records) == sum(s["records"] for s in stats.values())
    with pytest.raises(ValueError, match="modes"):
        G.GenerateConfig(modes=("fast",))


def test_reverse_kl_advantage_is_minus_the_kl_in_expectation_and_zero_for_the_teacher_itself():
    torch.manual_seed(0)
    s_V, t_V = torch.log_softmax(torch.randn(32) * 2, -1), torch.log_softmax(torch.randn(32) * 2, -1)
    tokens = torch.arange(32)[None]
    adv = D.reverse_kl_advantages(s_V[tokens], t_V[tokens], torch.ones(1, 32))
    expected = (s_V.exp() * adv[0]).sum()                      # E_{o ~ π_S}[A(o)]
    kl = (s_V.exp() * (s_V - t_V)).sum()
    assert expected <= 0 and torch.allclose(expected, -kl, atol=1e-6)
    assert D.reverse_kl_advantages(s_V[tokens], s_V[tokens], torch.ones(1, 32)).abs().max() == 0
    assert D.reverse_kl_advantages(s_V[tokens], t_V[tokens], torch.zeros(1, 32)).abs().max() == 0  # prompt: 0


def test_teacher_is_chosen_by_the_sample_domain():
    teachers = {"math": scale_weights(_model(1), std=0.1, seed=1), "logic": scale_weights(_model(2), std=0.1, seed=2)}
    tasks = T.make_tasks("math", 2) + T.make_tasks("logic", 2)
    replies = [[f"{t.answer}{EOS}" for t in tasks]]
    samples = rollout(ScriptedEngine(replies), TOK, tasks, group_size=1, params=SamplingParams(), thinking=False)
    batch = collate(samples, 288, "cpu")
    got = D.teacher_logprobs(teachers, samples, batch)
    for i, s in enumerate(samples):
        mine = D.token_logprobs(teachers[s.task.domain], batch["input_ids"][i:i + 1], batch["targets"][i:i + 1])
        other = D.token_logprobs(teachers["logic" if s.task.domain == "math" else "math"],
                                 batch["input_ids"][i:i + 1], batch["targets"][i:i + 1])
        assert torch.allclose(got[i], mine[0], atol=1e-5) and not torch.allclose(got[i], other[0], atol=1e-3)
    with pytest.raises(ValueError, match="no teacher for domain 'tool'"):
        D.teacher_logprobs({"math": teachers["math"]}, samples[:1] + rollout(
            ScriptedEngine([["1" + EOS]]), TOK, T.make_tasks("tool", 1), group_size=1, params=SamplingParams(),
            thinking=False), batch)


def test_on_policy_distillation_moves_the_student_but_not_its_indexer():
    student = scale_weights(_model(0), std=0.05)
    teachers = {"math": scale_weights(_model(1), std=0.05, seed=1)}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = D.OnPolicyConfig(steps=2, prompts_per_step=3, max_tokens=6, lr=1e-3, n_prompts=8)
    logs = []

    class Sink:
        def log(self, step, values):
            logs.append(values)

    out = D.on_policy_distill(student, teachers, cfg, metrics=Sink())
    assert out["steps"] == 2 and len(logs) == 2 and all("teacher_kl/math" in x for x in logs)
    assert [x["mode_thinking"] for x in logs] == [1.0, 0.0]           # the modes alternate
    assert all(x["reverse_kl"] >= -1e-6 for x in logs)                 # a KL estimate on the student's samples
    after = student.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and not any(".indexer." in k for k in moved)


def test_distill_commands(tmp_path):
    model = scale_weights(_model(), std=0.05)
    init = tmp_path / "init"
    model.save_pretrained(init)
    tasks = T.make_tasks("math", 4)
    rows = [{"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}],
             "reasoning_content": t.solution, "mode": mode, "domain": "math", "source_model": "x",
             "verifier_scores": {"total": 1.0}} for t in tasks for mode in ("thinking", "non_thinking")]
    data = G.write_jsonl(tmp_path / "math.jsonl", rows)
    out = tmp_path / "gen"
    assert cli(["distill", "train", "--init-from", str(init), "--data", str(data), "--out", str(out), "--steps", "2",
                "--batch-size", "1", "--seq-len", "128", "--on-policy-steps", "1", "--teacher", f"math={init}"]) == 0
    assert (out / "final" / "config.json").is_file() and (out / "on_policy" / "metrics.jsonl").is_file()
    trained = Transformer.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())
    gen = tmp_path / "logic.jsonl"
    assert cli(["distill", "generate", "--model", str(init), "--domain", "logic", "--out", str(gen), "--prompts", "2",
                "--samples", "2", "--max-tokens", "4"]) == 0
    stats = json.loads((tmp_path / "logic.stats.json").read_text())
    assert stats["domain"] == "logic" and stats["modes"]["thinking"]["candidates"] == 4 and gen.is_file()
    assert cli(["distill", "generate", "--model", str(init), "--domain", "poetry", "--out", str(gen)]) == 2
    assert cli(["distill", "train", "--init-from", str(init), "--data", str(data), "--out", str(out),
                "--teacher", "math"]) == 2
    assert cli(["distill", "fly"]) == 2


def test_specialists_run_without_the_math_presets_ema():
    from dsv32.distill.specialists import specialist_config
    from dsv32.rl.presets import get

    assert get("tiny-math").ema > 0   # the 10-minute run averages its policy ...
    cfg = specialist_config("math", 10)
    assert cfg.ema == 0 and cfg.thinking == "both" and cfg.steps == 10   # ... a 10-step specialist does not
    assert specialist_config("math", 10, {"ema": 0.5}).ema == 0.5
