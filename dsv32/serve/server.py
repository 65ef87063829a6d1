"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    dsv32 serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 32] [--thinking]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    r = client.chat.completions.create(model="<DIR's name>", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    r.choices[0].message.reasoning_content, r.choices[0].message.content

Endpoints: `/v1/chat/completions` and `/v1/completions` (both also as SSE streams), `/v1/models`, `/health`.
Thinking is chosen per request with `chat_template_kwargs: {"thinking": bool}` (vLLM's convention for
DeepSeek-V3.1/V3.2); the default is non-thinking, as in vLLM's DeepSeek templates and DeepSeek's
`deepseek-chat`, unless the server runs with `--thinking`. A non-thinking reply never samples `<think>` or
`</think>` (the template's opener closed the reasoning), so it holds no reasoning block. Reasoning comes back
as `reasoning_content` in the message (and in stream deltas), tool calls in OpenAI's `tool_calls` format
(`dsv32.data.chat` parses them).
Besides OpenAI's sampling fields the body takes vLLM's `top_k`, `min_p` and `stop_token_ids`; `max_tokens`
defaults to the rest of the context and is capped there (finish_reason "length"). Log-probs, where asked
for, are those of the sampling distribution (after temperature, top-k, top-p, min-p).

All requests share one engine: a single asyncio task adds them and runs `engine.step()` in a worker
thread, so concurrent requests decode together in one batch. Bad requests get a 4xx with an OpenAI-style
body `{"error": {"message", "type", "param", "code"}}`; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import chat
from .engine import Engine, StepEvent
from .sampling import SamplingParams
from .tokenizers import TextStream


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class EngineLoop:
    """The one task that touches the engine: requests are added and aborted between steps."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.pending: list[tuple[list[int], SamplingParams, asyncio.Future, asyncio.Queue]] = []
        self.aborts: list[int] = []
        self.queues: dict[int, asyncio.Queue] = {}
        self.wake = asyncio.Event()

    async def submit(self, prompt: list[int], params: SamplingParams, queue: asyncio.Queue) -> int:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((prompt, params, fut, queue))
        self.wake.set()
        return await fut

    def abort(self, rid: int) -> None:
        self.aborts.append(rid)
        self.wake.set()

    async def run(self) -> None:
        while True:
            if not (self.pending or self.aborts or self.engine.has_work()):
                await self.wake.wait()
            self.wake.clear()
            while self.pending:
                prompt, params, fut, queue = self.pending.pop(0)
                try:
                    rid = self.engine.add_request(prompt, params)
                except ValueError as e:
                    fut.set_exception(APIError(400, str(e)))
                    continue
                self.queues[rid] = queue
                fut.set_result(rid)
            while self.aborts:
                if self.queues.pop(rid := self.aborts.pop(), None) is not None:
                    self.engine.abort(rid)
            if not self.engine.has_work():
                continue
            try:
                events = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # noqa: BLE001 -- fail the requests in flight, keep serving
                for rid, queue in self.queues.items():
                    self.engine.abort(rid)
                    queue.put_nowait(APIError(500, f"generation failed: {e!r}", type_="server_error"))
                self.queues.clear()
                continue
            for ev in events:
                if (queue := self.queues.get(ev.request_id)) is not None:
                    queue.put_nowait(ev)
                    if ev.completion is not None:
                        del self.queues[ev.request_id]


# -- request fields --------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: tuple, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        want = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"'{name}' must be {want}, got {json.dumps(value)[:80]}", param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    return tuple(stop)


def _wants_logprobs(body: dict) -> bool:
    """Chat: `logprobs: true`; completions: `logprobs: <int>` (0 included: no alternatives, just the tokens')."""
    value = _field(body, "logprobs", (bool, int))
    return value is not None and value is not False


def _sampling(body: dict, prompt_len: int, max_len: int, n_choice: int) -> SamplingParams:
    """OpenAI (+ vLLM extension) sampling fields -> SamplingParams; 400 naming the field when wrong."""
    if prompt_len >= max_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {max_len} tokens, "
                            "which leaves no room to generate: shorten the prompt",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    room = max_len - prompt_len
    max_tokens = _field(body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,), room))
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0) != 0:
            raise APIError(400, f"'{name}' is not supported by dsv32 serve; leave it 0", name)
    if _field(body, "logit_bias", (dict,), {}):
        raise APIError(400, "'logit_bias' is not supported by dsv32 serve", "logit_bias")
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) for t in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    seed = _field(body, "seed", (int,))
    try:
        return SamplingParams(
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)), top_k=max(0, _field(body, "top_k", (int,), 0)),
            min_p=float(_field(body, "min_p", (int, float), 0.0)), max_tokens=min(max_tokens, room),
            stop=_stops(body), stop_token_ids=tuple(stop_ids), seed=None if seed is None else seed + n_choice,
            logprobs=_wants_logprobs(body))
    except ValueError as e:  # SamplingParams names the field: "SamplingParams.top_p=..."
        param = str(e).split("=")[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e).replace("SamplingParams.", ""), param) from e


class Choice:
    """One choice of a response: its text as it streams, parsed into reasoning/content/tool calls for chat."""

    def __init__(self, tokenizer, stops: tuple[str, ...], thinking: bool | None, call_ids: str = "call_"):
        self.text = TextStream(tokenizer.decode, stops, skip_special=thinking is None)
        self.parser = None if thinking is None else chat.StreamParser(thinking=thinking, id_prefix=call_ids)
        self.completion = None

    def step(self, ev: StepEvent) -> list[tuple[str, str]]:
        """New ("text" | "reasoning" | "content" | "tool_call", str) pieces for this token."""
        piece = self.text.push(ev.token_id)
        if ev.completion is not None:
            self.completion = ev.completion
            piece += self.text.finish()
        if self.parser is None:
            return [("text", piece)] if piece else []
        return self.parser.feed(piece) + (self.parser.finish() if ev.completion is not None else [])

    def finish_reason(self) -> str:
        if self.completion.finish_reason == "length":
            return "length"
        return "tool_calls" if self.parser is not None and self.parser.calls else "stop"

    def message(self) -> dict:
        parsed = self.parser.result()
        msg = {"role": "assistant", "content": parsed["content"] or (None if parsed["tool_calls"] else "")}
        if parsed["reasoning_content"] is not None:
            msg["reasoning_content"] = parsed["reasoning_content"]
        if parsed["tool_calls"]:
            msg["tool_calls"] = parsed["tool_calls"]
        return msg


# -- the app ---------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer, model_name: str, *, api_key: str | None = None,
               default_thinking: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (what `dsv32 serve` runs with uvicorn)."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["loop"] = EngineLoop(engine)
        task = asyncio.create_task(state["loop"].run())
        yield
        task.cancel()

    app = FastAPI(title="dsv32", lifespan=lifespan)
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(StarletteHTTPException,
                              lambda request, exc: APIError(exc.status_code, str(exc.detail)).response())
    app.add_exception_handler(Exception, lambda request, exc: APIError(
        500, f"internal error: {exc!r}", type_="server_error").response())

    def check_auth(request: Request) -> None:
        if api_key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                           f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") != model_name:
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                f"{model_name!r}", "model", "model_not_found")
        if not 1 <= _field(body, "n", (int,), 1) <= engine.max_batch:
            raise APIError(400, f"'n' must be in [1, {engine.max_batch}]", "n")
        return body

    async def run(prompt: list[int], body: dict, choices: list[Choice]):
        """Submit one request per choice; yield (choice index, its new pieces) until all finished. A client
        that goes away (the generator is closed) aborts what is left."""
        queue: asyncio.Queue = asyncio.Queue()
        rids, left = [], set()
        try:
            for i, c in enumerate(choices):
                params = _sampling(body, len(prompt), engine.max_len, i)
                if c.parser is not None and not c.parser.thinking:   # non-thinking chat: no reasoning block
                    params = params.banning(chat.reasoning_marker_ids(tokenizer))
                rids.append(await state["loop"].submit(prompt, params, queue))
                left.add(rids[-1])
            index = {rid: i for i, rid in enumerate(rids)}
            while left:
                ev = await queue.get()
                if isinstance(ev, APIError):
                    raise ev
                if ev.completion is not None:
                    left.discard(ev.request_id)
                yield index[ev.request_id], choices[index[ev.request_id]].step(ev)
        finally:
            for rid in left:
                state["loop"].abort(rid)

    def usage(prompt: list[int], choices: list[Choice]) -> dict:
        n_out = sum(len(c.completion.token_ids) for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out}

    def logprobs(c: Choice, chat_format: bool) -> dict | None:
        if c.completion.logprobs is None:
            return None
        toks = [tokenizer.decode([t]) for t in c.completion.token_ids]
        if chat_format:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(toks, c.completion.logprobs)]}
        return {"tokens": toks, "token_logprobs": c.completion.logprobs, "top_logprobs": None, "text_offset": []}

    async def respond(prompt: list[int], body: dict, choices: list[Choice], is_chat: bool):
        rid, created = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion" if is_chat else "text_completion", "created": created,
                "model": model_name}
        gen = run(prompt, body, choices)
        first = await anext(gen)  # errors of the request itself (400s) surface before any response is sent
        if not body.get("stream"):
            async for _ in gen:
                pass
            out = []
            for i, c in enumerate(choices):
                text = {"message": c.message()} if is_chat else {"text": c.text.text}
                out.append({"index": i, **text, "logprobs": logprobs(c, is_chat), "finish_reason": c.finish_reason()})
            return {**head, "choices": out, "usage": usage(prompt, choices)}

        head["object"] = "chat.completion.chunk" if is_chat else "text_completion"
        include_usage = bool((_field(body, "stream_options", (dict,), {}) or {}).get("include_usage"))

        def sse(choice: dict | None = None, **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': [] if choice is None else [choice], **extra})}\n\n"

        def chunks(i: int, pieces: list[tuple[str, str]]):
            c = choices[i]
            for kind, text in pieces:
                if kind == "text":
                    yield sse({"index": i, "text": text, "logprobs": None, "finish_reason": None})
                elif kind == "tool_call":
                    delta = {"tool_calls": [{"index": len(c.parser.calls) - 1, **json.loads(text)}]}
                    yield sse({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
                else:
                    delta = {"reasoning_content" if kind == "reasoning" else "content": text}
                    yield sse({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
            if c.completion is not None:
                end = {"delta": {}} if is_chat else {"text": ""}
                yield sse({"index": i, **end, "logprobs": logprobs(c, is_chat), "finish_reason": c.finish_reason()})

        async def stream():
            try:
                if is_chat:
                    for i in range(len(choices)):
                        yield sse({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None})
                for piece in chunks(*first):
                    yield piece
                async for i, pieces in gen:
                    for piece in chunks(i, pieces):
                        yield piece
                if include_usage:
                    yield sse(None, usage=usage(prompt, choices))
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: abort what is still generating
                await gen.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "dsv32",
                                            "max_model_len": engine.max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        thinking = (_field(body, "chat_template_kwargs", (dict,), {}) or {}).get("thinking", default_thinking)
        if not isinstance(thinking, bool):
            raise APIError(400, "chat_template_kwargs.thinking must be true or false", "chat_template_kwargs")
        tools = None if body.get("tool_choice") == "none" else _field(body, "tools", (list,), None)
        try:
            prompt = chat.encode_prompt(body.get("messages"), tokenizer, thinking=thinking, tools=tools)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from e
        tag = uuid.uuid4().hex[:12]
        choices = [Choice(tokenizer, _stops(body), thinking, f"call_{tag}_{i}_") for i in range(body.get("n") or 1)]
        return await respond(prompt, body, choices, is_chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise APIError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                           "prompt")
        choices = [Choice(tokenizer, _stops(body), None) for _ in range(body.get("n") or 1)]
        return await respond(ids, body, choices, is_chat=False)

    return app


def build(model_dir: str, *, max_batch: int = 32, max_len: int | None = None, device: str | None = None,
          dtype: str | None = None):
    """(engine, tokenizer) for an HF-format checkpoint directory."""
    import torch

    from ..model import Transformer
    from .tokenizers import load_tokenizer

    if not (Path(model_dir) / "config.json").exists():
        raise ValueError(f"{model_dir}: no config.json; --model takes a Hugging Face checkpoint directory "
                         "(e.g. runs/demo/final or a DeepSeek-V3.2 download)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(model_dir, dtype=None if dtype is None else getattr(torch, dtype),
                                        device=device).eval()
    tok = load_tokenizer(model_dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.cfg.vocab_size}; the checkpoint and tokenizer do not belong together")
    engine = Engine(model, max_batch=max_batch, max_len=max_len, eos_id=tok.eos_id, decode=tok.decode,
                    vocab_limit=tok.vocab_size)
    return engine, tok


def main(argv: list[str]) -> int:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(prog="dsv32 serve", description="OpenAI-compatible server for a dsv32 checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--name", help="model name clients ask for (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-len", type=int, help="context per request (default: the model's max_seq_len)")
    p.add_argument("--thinking", action="store_true", help="thinking mode by default (requests can still switch)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)")
    args = p.parse_args(argv)
    engine, tok = build(args.model, max_batch=args.max_batch, max_len=args.max_len, device=args.device,
                        dtype=args.dtype)
    name = args.name or Path(args.model).resolve().name
    app = create_app(engine, tok, name, api_key=args.api_key, default_thinking=args.thinking)
    print(f"dsv32 serve: {name} on http://{args.host}:{args.port}/v1 (max batch {engine.max_batch}, "
          f"context {engine.max_len})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
