"""Suite evaluation (dsv32/eval/suites.py): batched greedy decoding, the tool loop, scoring, the command."""

import json
import re

import pytest
import torch

from conftest import make_config, scale_weights
from dsv32.cli import main as cli
from dsv32.data.tokenizer import EOS, ByteTokenizer
from dsv32.eval import suites
from dsv32.model import Transformer
from dsv32.model.generate import greedy
from dsv32.rl import tasks as T

TOK = ByteTokenizer()
OUT_BEGIN = "<｜tool▁output▁begin｜>"
CALL = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>calc<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_batched_left_padded_greedy_matches_one_prompt_at_a_time(mode):
    model = scale_weights(Transformer(make_config(vocab_size=272)), std=0.15).set_attn_mode(mode).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23, 14)]  # > top-k 8: sparse
    batched = suites.generate(model, prompts, 12, eos_id=TOK.eos_id)
    for p, out in zip(prompts, batched):
        alone = greedy(model, torch.tensor([p]), 12, eos_token_id=TOK.eos_id)[0].tolist()
        assert out == alone[:len(out)] and len(out) >= 1


class Scripted(torch.nn.Module):
    """A stand-in policy with the model's decoding API that replies `reply(prompt_text)` token by token, so the
    suite's tool loop and scoring can be checked against known replies."""

    def __init__(self, reply):
        super().__init__()
        self.cfg, self.reply, self.w = make_config(vocab_size=272, max_seq_len=2048), reply, torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, batch, max_len):
        return {"step": 0}

    def forward(self, ids, cache=None, doc_ids=None):
        if cache["step"] == 0:
            cache["replies"] = [TOK.encode(self.reply(TOK.decode(row[d == 1].tolist()))) for row, d in zip(ids, doc_ids)]
        k, cache["step"] = cache["step"], cache["step"] + 1
        logits = torch.zeros(ids.shape[0], ids.shape[1], 272)
        for b, r in enumerate(cache["replies"]):
            logits[b, -1, r[min(k, len(r) - 1)]] = 1.0
        return logits


def _calc_tasks(n=4):
    return [t for t in T.make_tasks("tool", 40, split="heldout") if t.meta["calls"][0]["name"] == "calc"][:n]


def _uses_calc(text):
    if OUT_BEGIN in text:  # second round: answer with what the tool returned
        return text.rsplit(OUT_BEGIN, 1)[1].split("<")[0] + EOS
    expr = re.search(r"What is (\S+)\?", text).group(1)
    return CALL.replace("{}", json.dumps({"expr": expr})) + EOS


def test_tool_calls_run_and_their_outputs_come_back():
    tasks = _calc_tasks()
    res = suites.evaluate_suites(Scripted(_uses_calc), {"tool": tasks}, modes=("non_thinking",), examples=1)
    d = res["details"]["tool"]["non_thinking"]
    assert res["accuracy"]["tool"]["non_thinking"] == 1.0 and d["tool_call_rate"] == 1.0 and d["format_ok"] == 1.0
    want = sum(len(TOK.encode(CALL.replace("{}", json.dumps(t.meta["calls"][0]["arguments"])) + EOS))
               + len(TOK.encode(t.answer + EOS)) for t in tasks) / len(tasks)  # both assistant turns
    assert d["mean_length"] == want and d["no_reasoning_block"] == 1.0
    assert d["examples"][0]["correct"] and d["examples"][0]["reply"].endswith(tasks[0].answer + EOS)

    guess = suites.evaluate_suites(Scripted(lambda text: "1234" + EOS), {"tool": tasks}, modes=("non_thinking",))
    assert guess["accuracy"]["tool"]["non_thinking"] == 0.0 and guess["details"]["tool"]["non_thinking"][
        "tool_call_rate"] == 0.0


def test_scoring_by_mode_truncation_and_reasoning_blocks():
    tasks = T.make_tasks("math", 6, split="heldout")
    answer = {t.prompt: t.answer for t in tasks}

    def solve(text, think):
        a = answer[re.search(r"<｜User｜>(.*?)<｜Assistant｜>", text).group(1)]
        return (f"steps</think>{a}" if think else a) + EOS

    res = suites.evaluate_suites(Scripted(lambda s: solve(s, s.endswith("<think>"))), {"math": tasks})
    assert res["accuracy"] == {"math": {"thinking": 1.0, "non_thinking": 1.0}}
    assert res["details"]["math"]["non_thinking"]["no_reasoning_block"] == 1.0

    leaky = suites.evaluate_suites(Scripted(lambda s: solve(s, True)), {"math": tasks}, modes=("non_thinking",))
    d = leaky["details"]["math"]["non_thinking"]
    assert d["no_reasoning_block"] == 0.0 and d["format_ok"] == 0.0

    cut = suites.evaluate_suites(Scripted(lambda s: solve(s, False)[:-len(EOS)] + " and more text"), {"math": tasks},
                                 modes=("non_thinking",), max_tokens=3)
    d = cut["details"]["math"]["non_thinking"]
    assert d["truncated"] == 1.0 and d["accuracy"] == 0.0 and d["mean_length"] == 3


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
