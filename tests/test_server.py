"""The OpenAI-compatible server, tested with the official `openai` client against a live local server.

The served model is a real dsv32 Transformer saved in the HF format whose weights are set by hand so that
its greedy output is known: the attention and MLP outputs are zeroed, so the residual stream is the current
token's embedding, and the LM head scores token j by the cosine between the current token and j's chosen
predecessor. The model therefore follows a successor table (a -> b -> ... -> z -> a, and a scripted
assistant turn after the chat openers): the tests can assert the exact reasoning, content and tool calls the
server must return, in both thinking modes, while all of it runs through the engine, template and parser.
"""

import asyncio
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn
from conftest import successor_model

from dsv32 import Transformer
from dsv32.data.tokenizer import ByteTokenizer
from dsv32.serve import chat_cli
from dsv32.serve.server import build, create_app
from dsv32.serve.tokenizers import TextStream

TOK = ByteTokenizer()
KEY = "test-key"
NAME = "scripted"
MAX_LEN = 200
# The assistant turn the model writes after `<｜Assistant｜><think>`; after `</think>` it writes the rest.
SCRIPT = ["<think>", "H", "M", "</think>", "O", "K", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "F",
          "<｜tool▁sep｜>", "{", "}", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜end▁of▁sentence｜>"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def successors() -> dict[int, int]:
    ids = [TOK.encode(s)[0] for s in SCRIPT]
    table = dict(zip(ids, ids[1:]))
    table.update({ord(a): ord(b) for a, b in zip(LETTERS, LETTERS[1:] + LETTERS[0])})
    return table


def scripted_model() -> Transformer:
    return successor_model(successors(), TOK.vocab_size)


def letters_after(c: str, n: int) -> str:
    i = LETTERS.index(c)
    return "".join(LETTERS[(i + k + 1) % 26] for k in range(n))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One live server for the module: uvicorn in a thread, on a free port, with an API key."""
    model_dir = tmp_path_factory.mktemp("model") / NAME
    scripted_model().save_pretrained(model_dir)
    engine, tok = build(str(model_dir), max_batch=16, max_len=MAX_LEN, device="cpu")
    app = create_app(engine, tok, NAME, api_key=KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    yield {"base": base, "engine": engine, "dir": model_dir,
           "client": openai.OpenAI(base_url=base, api_key=KEY, max_retries=0),
           "aclient": lambda: openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)}
    srv.should_exit = True
    thread.join(timeout=10)


def raw(url: str, body: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A plain HTTP request (no client library in between): (status, JSON body)."""
    req = urllib.request.Request(url, data=None if body is None else body.encode(), headers=headers or {},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(client, thinking=None, **kw):
    extra = {"chat_template_kwargs": {"thinking": thinking}} if thinking is not None else {}
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                          temperature=0, extra_body=extra, **kw)


def test_models_and_auth(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == [NAME]
    status, body = raw(server["base"] + "/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(bad)


def test_chat_thinking_returns_reasoning_content_and_tool_call(server):
    r = ask(server["client"], thinking=True)
    msg, choice = r.choices[0].message, r.choices[0]
    assert msg.reasoning_content == "HM"
    assert msg.content == "OK"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("F", {})]
    assert msg.tool_calls[0].type == "function" and msg.tool_calls[0].id
    assert choice.finish_reason == "tool_calls"
    prompt = TOK.encode("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(SCRIPT) - 1 and r.usage.total_tokens == len(prompt) + len(SCRIPT) - 1


def test_chat_non_thinking_has_no_reasoning_content(server):
    for r in (ask(server["client"], thinking=False), ask(server["client"])):  # non-thinking is the default
        msg = r.choices[0].message
        assert msg.content == "OK" and msg.tool_calls[0].function.name == "F"
        assert getattr(msg, "reasoning_content", None) is None
        assert r.usage.completion_tokens == len(SCRIPT) - 4  # no "HM</think>"


def test_chat_truncation_and_stop_strings(server):
    r = ask(server["client"], thinking=True, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.reasoning_content == "HM" and r.choices[0].message.content == ""
    r = ask(server["client"], thinking=False, stop=["K"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "O"
    assert not r.choices[0].message.tool_calls


def stream_chat(client, thinking, **kw):
    extra = {"chat_template_kwargs": {"thinking": thinking}}
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                 temperature=0, stream=True, extra_body=extra,
                                                 stream_options={"include_usage": True}, **kw))
    out = {"reasoning": "", "content": "", "calls": [], "finish": None, "usage": None, "n_deltas": 0}
    for ch in chunks:
        if ch.usage is not None:
            out["usage"] = ch.usage
        for c in ch.choices:
            d = c.delta
            out["reasoning"] += getattr(d, "reasoning_content", None) or ""
            out["content"] += d.content or ""
            out["calls"] += d.tool_calls or []
            out["finish"] = c.finish_reason or out["finish"]
            out["n_deltas"] += 1
            if not thinking:
                assert getattr(d, "reasoning_content", None) is None
    return out


def test_chat_streaming(server):
    s = stream_chat(server["client"], thinking=True)
    assert (s["reasoning"], s["content"], s["finish"]) == ("HM", "OK", "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in s["calls"]] == [("F", "{}")]
    assert s["n_deltas"] >= 5  # really streamed: pieces, not one final blob
    assert s["usage"].completion_tokens == len(SCRIPT) - 1
    s = stream_chat(server["client"], thinking=False)
    assert (s["reasoning"], s["content"], s["finish"]) == ("", "OK", "tool_calls")


def test_completions(server):
    client = server["client"]
    r = client.completions.create(model=NAME, prompt="the abc", max_tokens=5, temperature=0)
    assert r.choices[0].text == "defgh" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 5
    r = client.completions.create(model=NAME, prompt=TOK.encode("xy"), max_tokens=8, temperature=0, stop=["bc"])
    assert r.choices[0].text == "za" and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="m", max_tokens=6,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == "nopqrs" and len([p for p in pieces if p]) >= 3


@pytest.mark.parametrize("case", ["bad_json", "unknown_model", "negative_max_tokens", "prompt_too_long",
                                  "bad_messages", "bad_top_p"])
def test_malformed_requests_get_4xx_json_and_server_keeps_serving(server, case):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    good = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    body = {"bad_json": '{"model": "scripted", "messages": [',
            "unknown_model": json.dumps({**good, "model": "gpt-4"}),
            "negative_max_tokens": json.dumps({**good, "max_tokens": -5}),
            "prompt_too_long": json.dumps({**good, "messages": [{"role": "user", "content": "x" * MAX_LEN}]}),
            "bad_messages": json.dumps({**good, "messages": [{"role": "robot", "content": "hi"}]}),
            "bad_top_p": json.dumps({**good, "top_p": 1.5})}[case]
    status, reply = raw(server["base"] + "/chat/completions", body, headers)
    assert 400 <= status < 500
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    want = {"unknown_model": (404, "model"), "negative_max_tokens": (400, "max_tokens"),
            "prompt_too_long": (400, "messages"), "bad_messages": (400, "messages"), "bad_top_p": (400, "top_p"),
            "bad_json": (400, None)}[case]
    assert (status, err["param"]) == want
    if case == "prompt_too_long":
        assert err["code"] == "context_length_exceeded"
    assert ask(server["client"], thinking=False).choices[0].message.content == "OK"  # still serving


def test_sixteen_concurrent_requests_are_batched_and_correct(server):
    engine = server["engine"]
    starts = LETTERS[:8]

    async def one(client, i):
        if i % 2:
            r = await client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"q{i}"}], temperature=0,
                extra_body={"chat_template_kwargs": {"thinking": i % 4 == 1}})
            m = r.choices[0].message
            return (getattr(m, "reasoning_content", None), m.content, m.tool_calls[0].function.name)
        r = await client.completions.create(model=NAME, prompt=starts[i // 2], max_tokens=3 + i, temperature=0)
        return r.choices[0].text

    async def burst():
        client = server["aclient"]()
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    peak_before = engine.peak_running
    engine.peak_running = 0
    answers = asyncio.run(burst())
    for i, a in enumerate(answers):
        if i % 2:
            assert a == ("HM" if i % 4 == 1 else None, "OK", "F")
        else:
            assert a == letters_after(starts[i // 2], 3 + i)
    assert engine.peak_running > 1  # they were decoded together, not one after another
    engine.peak_running = max(engine.peak_running, peak_before)


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    s = TextStream(TOK.decode, ("END",), skip_special=True)
    pieces = [s.push(t) for t in "é".encode() + b"xEN"]
    assert pieces == ["", "é", "x", "", ""]  # half of é held back; "E", "EN" might start "END"
    assert s.push(ord("D")) == "" and s.finish() == "" and s.text == "éx"  # the stop string is never sent
    s = TextStream(TOK.decode, ("END",), skip_special=True)
    assert [s.push(t) for t in b"EX"] == ["", "EX"] and s.finish() == ""  # released once it is not "END"
    s = TextStream(TOK.decode, skip_special=False)
    assert [s.push(t) for t in [*b"a", 257, 0xC3]] == ["a", "<｜end▁of▁sentence｜>", ""]
    assert s.finish() == "\ufffd" and s.text == "a<｜end▁of▁sentence｜>\ufffd"  # a cut character, at the end


def test_chat_repl(server):
    lines = iter(["hi", "/think", "hello", "/reset", "/exit"])
    out = io.StringIO()
    engine, tok = build(str(server["dir"]), max_batch=2, max_len=MAX_LEN, device="cpu")
    chat_cli.repl(engine, tok, read=lambda prompt: next(lines), out=out, color=True, temperature=0)
    text = out.getvalue()
    plain = text.replace(chat_cli.DIM, "").replace(chat_cli.RESET, "")
    assert plain.count("OK") == 2 and plain.count("HM") == 1  # thinking only after /think
    assert chat_cli.DIM + "HM" in text
    assert "thinking on" in plain and "reset" in plain


def test_n_choices_seeds_and_logprobs(server):
    r = ask(server["client"], thinking=False, n=3, logprobs=True, max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "OK" and c.finish_reason == "length" for c in r.choices)
    lp = r.choices[0].logprobs.content
    assert [t.token for t in lp] == ["O", "K"] and all(t.logprob == 0.0 for t in lp)  # greedy: kept = argmax
    assert r.usage.completion_tokens == 6
    client = server["client"]
    sampled = [client.completions.create(model=NAME, prompt="q", max_tokens=4, temperature=1.0, seed=s, logprobs=0)
               for s in (1, 1)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text == "rstu"  # the table leaves ~no randomness
    assert all(lp <= 0 for lp in sampled[0].choices[0].logprobs.token_logprobs)


def test_load_tokenizer_hf_and_byte(tmp_path):
    """A model directory with a Hugging Face tokenizer gets it (built here with `tokenizers`, no download);
    one without gets the byte tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv32.data import chat
    from dsv32.data.tokenizer import SPECIALS
    from dsv32.serve.tokenizers import HFTokenizer, load_tokenizer

    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[1], "bos_token": SPECIALS[0]}))
    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer) and hf.eos_id == tok.token_to_id(SPECIALS[1])
    ids = chat.encode_prompt([{"role": "user", "content": "hello fox"}], hf, thinking=True)
    assert ids[0] == tok.token_to_id(SPECIALS[0]) and ids[-1] == tok.token_to_id("<think>")
    assert hf.decode(ids) == chat.render([{"role": "user", "content": "hello fox"}], thinking=True)
    assert hf.decode(ids, skip_special=True) == "hello fox"


def test_client_leaving_a_stream_aborts_its_request(server):
    engine = server["engine"]
    aborted, original = [], engine.abort
    engine.abort = lambda rid: (original(rid), aborted.append(rid))[0]  # recorded once done
    try:
        stream = server["client"].completions.create(model=NAME, prompt="a", max_tokens=MAX_LEN - 2, temperature=0,
                                                     stream=True)
        got = [next(stream).choices[0].text for _ in range(3)]
        stream.close()
        assert "".join(got) == "bcd"
        deadline = time.time() + 20
        while not aborted and time.time() < deadline:
            time.sleep(0.02)
        assert aborted, "the request kept running after its client left"
    finally:
        engine.abort = original
