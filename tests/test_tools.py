"""Calculator, lookup, the registry and the tool-calling loop (the sandbox has its own file)."""

import json
import re

import pytest
import torch
from conftest import make_config

from dsv32.data.chat import (CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END, OUTPUT_BEGIN, OUTPUT_END,
                             encode_for_training, render)
from dsv32.data.tokenizer import ASSISTANT, EOS, THINK_BEGIN, THINK_END, ByteTokenizer
from dsv32.model import Transformer
from dsv32.serve.engine import Engine
from dsv32.serve.sampling import SamplingParams
from dsv32.tools import (CalculatorError, DocumentIndex, Limits, Tool, ToolRegistry, calculate, default_registry,
                         load_documents, run_tool_loop)
from dsv32.tools.calculator import SCHEMA as CALC_SCHEMA


@pytest.mark.parametrize("expr, want", [
    ("2 * (3 + 4) ** 2", "98"), ("-3 + +5", "2"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 % 3", "2"),
    ("2 ^ 10", "1024"), ("sqrt(16) + abs(-2)", "6"), ("max(3, 9, 4) - min(2, 8)", "7"), ("round(2.675, 2)", "2.67"),
    ("123456789 * 987654321", "121932631112635269"), ("2 ** 100", "1267650600228229401496703205376"),
    ("0.1 + 0.2", "0.3"), ("pi", "3.14159265359"), ("factorial(10)", "3628800"), ("1e3", "1000"),
])
def test_calculator_values(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize("expr, message", [
    ("__import__('os').system('ls')", "not allowed"), ("(1).__class__", "not allowed"), ("x + 1", "name 'x'"),
    ("open('f')", "function call"), ("lambda: 1", "not allowed"), ("'a' * 3", "not allowed"),
    ("[1, 2]", "not allowed"), ("1 if 1 else 2", "not allowed"), ("9 ** 9 ** 9", "exponent"),
    ("7 ** 5000", "bits"), ("2 ** 4000 * 2 ** 4000", "bits"), ("1 / 0", "division by zero"),
    ("1 +", "syntax error"), ("1" * 600, "longer than"), ("+".join(["1"] * 150), "parts"),
    ("factorial(5000)", "factorial"), ("10.0 ** 400", "Numerical result out of range|not finite"),
    ("(-8) ** 0.5", "complex"), ("sqrt(-1)", "math domain"), ("", "non-empty"),
])
def test_calculator_refuses(expr, message):
    with pytest.raises(CalculatorError, match=message):
        calculate(expr)


def test_lookup_ranks_by_bm25_and_reads_a_directory(tmp_path):
    index = DocumentIndex(["Paris is the capital of France.", "Berlin is the capital of Germany.",
                           {"text": "The Rhine flows through Germany.", "title": "rivers"}])
    hits = index.search("capital of Germany", k=3)
    assert hits[0].text.startswith("Berlin") and hits[0].score > hits[1].score
    assert index.search("zebra") == [] and index("zebra") == "no results"
    assert index("rhine", k=1) == "[1] rivers: The Rhine flows through Germany."
    (tmp_path / "a.txt").write_text("Alpha paragraph one.\n\nBeta paragraph two.\n")
    (tmp_path / "b.md").write_text("# Gamma\nnotes")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Delta fact", "title": "d"}) + "\n\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    docs = load_documents(tmp_path)
    assert [(d.title, d.text) for d in docs] == [("a", "Alpha paragraph one."), ("a", "Beta paragraph two."),
                                                 ("b", "# Gamma\nnotes"), ("d", "Delta fact")]
    assert DocumentIndex(tmp_path).search("beta")[0].text == "Beta paragraph two."
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2"):
        load_documents(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        load_documents(str(tmp_path / "missing"))


def test_registry_schemas_render_and_errors_become_results():
    registry = default_registry(documents=["Paris is the capital of France."], limits=Limits(cpu_s=1, wall_s=5))
    assert registry.names == ["calculator", "python", "lookup"]
    text = render([{"role": "user", "content": "hi"}], thinking=True, tools=registry.schemas())
    assert all(f'"name": "{n}"' in text for n in registry.names)
    assert registry.call("calculator", '{"expression": "6*7"}').content == "42"
    assert registry.call("lookup", {"query": "capital France"}).content.startswith("[1] Paris")
    assert registry.call("python", {"code": "print(6 * 7)"}).content == "42\n"
    for name, args, message in [("nope", "{}", "unknown tool 'nope'"), ("calculator", "{bad", "not valid JSON"),
                                ("calculator", "[1]", "JSON object"), ("calculator", {}, "missing required"),
                                ("calculator", {"expression": 5}, "must be a string"),
                                ("calculator", {"expression": "1", "x": 1}, "unknown argument 'x'"),
                                ("calculator", {"expression": "1/0"}, "division by zero")]:
        result = registry.call(name, args)
        assert result.error and message in result.content, (name, args, result)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Tool(CALC_SCHEMA, calculate))
    with pytest.raises(ValueError, match="schema must be"):
        registry.register(Tool({"name": "x"}, calculate))
    small = ToolRegistry([Tool({"type": "function", "function": {"name": "echo", "parameters": {}}},
                               lambda **kw: "x" * 100)], max_output_chars=10)
    assert small.call("echo", "").content.startswith("x" * 10 + "\n[truncated")


class ScriptedModel:
    """Stands in for a trained model: asks the calculator, then answers with the number the tool returned
    (read back from the prompt, so the test sees that tool results reach the model)."""

    def __init__(self, expression: str, thinking: bool):
        self.expression, self.thinking, self.prompts = expression, thinking, []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        think = "I should compute this." + THINK_END if self.thinking else ""
        results = re.findall(re.escape(OUTPUT_BEGIN) + "(.*?)" + re.escape(OUTPUT_END), prompt)
        if not results:
            args = json.dumps({"expression": self.expression})
            return f"{think}{CALLS_BEGIN}{CALL_BEGIN}calculator{CALL_SEP}{args}{CALL_END}{CALLS_END}{EOS}"
        return f"{think}The answer is {results[-1]}.{EOS}"


@pytest.mark.parametrize("thinking", [True, False])
def test_loop_runs_tools_and_keeps_the_exact_text(thinking):
    model = ScriptedModel("12 * 34", thinking)
    registry = default_registry(python=False)
    messages = [{"role": "user", "content": "What is 12*34?"}]
    t = run_tool_loop(model, messages, registry, thinking=thinking)
    assert t.stop_reason == "answer" and t.well_formed and t.n_tool_calls == 1 and len(t.turns) == 2
    assert [m["role"] for m in t] == ["user", "assistant", "tool", "assistant"] and len(messages) == 1
    assert t[2]["content"] == "408" and t[2]["tool_call_id"] == t[1]["tool_calls"][0]["id"] == "call_0_0"
    assert t[-1]["content"] == "The answer is 408."
    # The second prompt extends the first by exactly the model's text, the tool output and the opener.
    opener = ASSISTANT + (THINK_BEGIN if thinking else THINK_END)
    assert model.prompts[1] == model.prompts[0] + t.turns[0]["completion"] + t.segments[2][0]
    assert t.segments[2][0].endswith(opener) and model.prompts[0].endswith(opener)
    assert t.text == render(t, thinking=thinking, tools=registry.schemas(), add_generation_prompt=False)
    # Reasoning is kept across the tool round (both turns are after the last user message).
    assert t.text.count("I should compute this.") == (2 if thinking else 0)
    # The loss mask of the transcript trains exactly the generated segments.
    tok = ByteTokenizer()
    ids, mask = encode_for_training(t, tok, thinking=thinking, tools=registry.schemas())
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(s for s, gen in t.segments if gen)


def test_loop_tool_errors_max_turns_truncation_and_outputs_with_text():
    registry = default_registry(python=False)

    class Output:   # what a wrapped engine may return: text plus token ids, log-probs, ...
        def __init__(self, text):
            self.text, self.token_ids = text, [1, 2, 3]

    def always_call(prompt):
        return Output(f"{CALLS_BEGIN}{CALL_BEGIN}calculator{CALL_SEP}{{\"expression\": \"1/0\"}}{CALL_END}"
                      f"{CALLS_END}{EOS}")

    t = run_tool_loop(always_call, [{"role": "user", "content": "q"}], registry, thinking=False, max_turns=3)
    assert t.stop_reason == "max_turns" and len(t.turns) == 3
    assert [m["error"] for m in t if m["role"] == "tool"] == [True, True]
    assert "division by zero" in t[2]["content"] and t.turns[0]["output"].token_ids == [1, 2, 3]
    t = run_tool_loop(lambda p: "I was cut off mid-sen", [{"role": "user", "content": "q"}], registry,
                      thinking=True)
    assert t.stop_reason == "truncated" and not t.well_formed and len(t.turns) == 1
    t = run_tool_loop(lambda p: f"{CALLS_BEGIN}{CALL_BEGIN}nope{CALL_SEP}{{}}{CALL_END}{CALLS_END}{EOS}"
                      if OUTPUT_BEGIN not in p else f"done{EOS}", [{"role": "user", "content": "q"}], registry,
                      thinking=False)
    assert t.stop_reason == "answer" and "unknown tool 'nope'" in t[2]["content"]
    with pytest.raises(TypeError, match="generate_fn"):
        run_tool_loop(lambda p: 42, [{"role": "user", "content": "q"}], registry, thinking=False)
    with pytest.raises(ValueError, match="max_turns"):
        run_tool_loop(lambda p: "", [{"role": "user", "content": "q"}], registry, thinking=False, max_turns=0)


def test_loop_with_the_engine_and_an_untrained_model_never_raises():
    """Random weights write random bytes and specials: the loop must still end cleanly with a parse per turn."""
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = Transformer(make_config(vocab_size=tok.vocab_size, max_seq_len=2048)).eval()
    engine = Engine(model, max_batch=4, eos_id=tok.eos_id, decode=tok.decode)
    registry = default_registry(python=False)

    def generate(prompt: str) -> str:
        out = engine.generate([tok.encode(prompt)], SamplingParams(temperature=1.0, max_tokens=24, seed=1))[0]
        return tok.decode(out.token_ids)

    for thinking in (True, False):
        t = run_tool_loop(generate, [{"role": "user", "content": "2+2?"}], registry, thinking=thinking, max_turns=2,
                          show_tools=False)
        assert t.stop_reason in ("answer", "truncated", "max_turns") and 1 <= len(t.turns) <= 2
        assert all(isinstance(turn["parsed"]["well_formed"], bool) for turn in t.turns)
        assert t.text.startswith(t.turns[0]["prompt"])
