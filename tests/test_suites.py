"""Suite evaluation (dsv32/eval/suites.py): scoring of rollouts, greedy decoding through the engine, the command."""

import json

import torch

from conftest import make_config, scale_weights
from dsv32.cli import main as cli
from dsv32.data.chat import assistant_open, tool_outputs_text
from dsv32.data.tokenizer import EOS, ByteTokenizer
from dsv32.eval import suites
from dsv32.model import Transformer
from dsv32.model.generate import greedy
from dsv32.rl import tasks as T
from dsv32.rl.rollout import Sample, task_prompt

TOK = ByteTokenizer()
CALL = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calc<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"


def _sample(task, reply: str, thinking: bool, truncated=False, tool_turn: str | None = None):
    """A rollout record as `rollout` builds it: prompt, then the model's turns (and tool outputs between)."""
    prompt = task_prompt(task, TOK, thinking)
    ids, mask, transcript = list(prompt), [0] * len(prompt), [{"role": "user", "content": task.prompt}]
    if tool_turn is not None:
        call = TOK.encode(tool_turn)
        more = TOK.encode(tool_outputs_text(["x"]) + assistant_open(thinking))
        ids, mask = ids + call + more, mask + [1] * len(call) + [0] * len(more)
        transcript += [{"role": "assistant", "content": ""}, {"role": "tool", "content": "x"}]
    gen = TOK.encode(reply)
    return Sample(0, task, thinking, ids + gen, len(prompt), mask + [1] * len(gen), [0.0] * (len(ids) + len(gen)),
                  text=reply, transcript=transcript, truncated=truncated)


def test_score_accuracy_lengths_format_and_reasoning_blocks():
    math = T.make_tasks("math", 4, split="heldout")
    right = [_sample(t, f"{t.answer}{EOS}", False) for t in math[:2]]
    leaky = _sample(math[2], f"<think>x</think>{math[2].answer}{EOS}", False)   # reasoning in non-thinking mode
    cut = _sample(math[3], math[3].answer, False, truncated=True)                  # right text, but truncated
    d = suites.score(right + [leaky, cut], TOK)
    assert d["accuracy"] == 0.75 and d["n"] == 4 and d["truncated"] == 0.25  # the leaky reply's answer counts
    assert d["no_reasoning_block"] == 0.75 and d["format_ok"] == 0.5
    assert d["mean_length"] == sum(len(TOK.encode(x.text)) for x in right + [leaky, cut]) / 4

    think = suites.score([_sample(t, f"{t.solution}</think>{t.answer}{EOS}", True) for t in math], TOK)
    assert think["accuracy"] == 1.0 and think["format_ok"] == 1.0 and "no_reasoning_block" not in think

    tool = T.make_tasks("tool", 2, split="heldout")
    called = _sample(tool[0], f"{tool[0].answer}{EOS}", False, tool_turn=CALL + EOS)
    guessed = _sample(tool[1], f"1{EOS}", False)
    d = suites.score([called, guessed], TOK)
    assert d["tool_call_rate"] == 0.5 and d["accuracy"] == 0.5
    assert d["mean_length"] == (len(TOK.encode(CALL + EOS)) + len(TOK.encode(tool[0].answer + EOS)) + 2) / 2


def test_evaluate_suites_is_greedy_decoding():
    model = scale_weights(Transformer(make_config(vocab_size=272)), std=0.15)
    tasks = T.make_tasks("logic", 3, split="heldout")
    res = suites.evaluate_suites(model, {"logic": tasks}, max_tokens=10, examples=3)
    assert set(res["accuracy"]["logic"]) == {"thinking", "non_thinking"} and model.training
    for mode, thinking in suites.MODES.items():
        for t, ex in zip(tasks, res["details"]["logic"][mode]["examples"]):
            want = greedy(model.eval(), torch.tensor([task_prompt(t, TOK, thinking)]), 10, eos_token_id=TOK.eos_id)
            assert ex["reply"] == TOK.decode(want[0].tolist()) and ex["prompt"] == t.prompt


def test_eval_suites_command(tmp_path):
    model_dir = tmp_path / "m"
    Transformer(make_config(vocab_size=272)).save_pretrained(model_dir)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"prompt": "What is 2+3?", "answer": "5", "domain": "math"}\n'
                     '{"prompt": "Say in uppercase: hi", "answer": "HI", "domain": "alignment"}\n')
    out = tmp_path / "r.json"
    assert cli(["eval", "suites", "--model", str(model_dir), "--tasks", str(tasks), "--max-tokens", "4",
                "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == {"math", "alignment"}
    for domain in ("math", "alignment"):
        assert set(res["accuracy"][domain]) == {"thinking", "non_thinking"}
        for mode, d in res["details"][domain].items():
            assert 0.0 <= d["accuracy"] <= 1.0 and d["n"] == 1 and 0 < d["mean_length"] <= 4
    assert cli(["eval", "suites", "--model", str(model_dir), "--domains", "math,chess"]) == 2
    assert cli(["eval", "suites", "--model", str(model_dir), "--n", "2", "--mode", "thinking", "--domains", "logic",
                "--max-tokens", "2"]) == 0


def test_non_thinking_replies_never_sample_a_reasoning_marker():
    """A model that wants `</think>` after `</think>` (the non-thinking opener) forever: the rollout bans the
    markers in non-thinking mode, so its replies hold none; the score keeps the rate before the ban (0 here)."""
    from dsv32.data.chat import reasoning_marker_ids
    from dsv32.serve.engine import Engine
    from dsv32.serve.sampling import SamplingParams
    from dsv32.rl.rollout import rollout
    from conftest import successor_model

    begin, end = reasoning_marker_ids(TOK)
    model = successor_model({end: end, begin: end}, TOK.vocab_size).eval()
    tasks = T.make_tasks("math", 3, split="heldout")
    engine = Engine(model, max_batch=8, eos_id=TOK.eos_id, decode=TOK.decode, vocab_limit=TOK.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=5)
    direct = rollout(engine, TOK, tasks, group_size=1, params=params, thinking=False)
    assert all(s.banned_argmax >= 1 and not {begin, end} & set(s.ids[s.prompt_len:]) for s in direct)
    d = suites.score(direct, TOK)
    assert d["no_reasoning_block"] == 1.0 and d["no_reasoning_block_unbanned"] == 0.0
    think = rollout(engine, TOK, tasks, group_size=1, params=params, thinking=True)   # nothing banned here
    assert all(s.ids[s.prompt_len] == end and s.banned_argmax == 0 for s in think)
