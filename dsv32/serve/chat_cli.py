"""`dsv32 chat`: talk to a checkpoint in the terminal, streaming, with the V3.2 thinking switch.

    dsv32 chat --model runs/demo/final [--thinking] [--temperature 0.7] [--max-tokens 512] [--system TEXT]

Commands: `/think` toggles thinking mode, `/reset` starts a new conversation, `/exit` (or Ctrl-D) quits;
Ctrl-C stops the answer being written. Reasoning is shown dimmed (plain with NO_COLOR set or when the output
is not a terminal). The model runs in this process through the same engine the server uses.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TextIO

from ..data import chat
from .engine import Engine
from .sampling import SamplingParams
from .tokenizers import TextStream

DIM, RESET = "\x1b[2m", "\x1b[0m"


class _Printer:
    """Writes parser events; reasoning dimmed (one escape at each switch, not per piece)."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color, self.dim = out, color, False

    def _set_dim(self, on: bool) -> None:
        if self.color and on != self.dim:
            self.out.write(DIM if on else RESET)
        self.dim = on

    def write(self, events: list[tuple[str, str]]) -> None:
        for kind, text in events:
            self._set_dim(kind == "reasoning")
            if kind == "tool_call":
                import json

                fn = json.loads(text)["function"]
                text = f"\n[tool call] {fn['name']}({fn['arguments']})"
            self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self._set_dim(False)
        self.out.write("\n")
        self.out.flush()


def answer(engine: Engine, tokenizer, messages: list[dict], *, thinking: bool, params: SamplingParams,
           printer: _Printer) -> dict:
    """Generate one assistant turn, streaming it to `printer`; returns the parsed turn."""
    prompt = chat.encode_prompt(messages, tokenizer, thinking=thinking)
    room = engine.max_len - len(prompt)
    if room < 1:
        raise ValueError(f"the conversation has {len(prompt)} tokens, the context {engine.max_len}: /reset")
    params.max_tokens = min(params.max_tokens, room)
    if not thinking:   # the opener closed the reasoning: the reply never opens another block
        params = params.banning(chat.reasoning_marker_ids(tokenizer))
    rid = engine.add_request(prompt, params)
    stream, parser = TextStream(tokenizer.decode, (), False), chat.StreamParser(thinking=thinking)
    try:
        done = False
        while not done:
            for ev in engine.step():
                if ev.request_id != rid:
                    continue
                printer.write(parser.feed(stream.push(ev.token_id)))
                if ev.completion is not None:
                    printer.write(parser.feed(stream.finish()) + parser.finish())
                    done = True
    except KeyboardInterrupt:
        engine.abort(rid)
        printer.write(parser.feed(stream.finish()) + parser.finish())
    printer.end()
    return parser.result()


def repl(engine: Engine, tokenizer, *, thinking: bool = False, system: str | None = None,
         read: Callable[[str], str] = input, out: TextIO = sys.stdout, color: bool | None = None,
         temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 512) -> None:
    """The read-eval-print loop (`read` and `out` are parameters so tests can drive it)."""
    if color is None:
        color = out.isatty() and "NO_COLOR" not in os.environ
    printer = _Printer(out, color)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"dsv32 chat: /think toggles thinking (now {'on' if thinking else 'off'}), /reset, /exit\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/think":
            thinking = not thinking
            out.write(f"thinking {'on' if thinking else 'off'}\n")
            continue
        if cmd == "/reset":
            messages = list(start)
            out.write("conversation reset\n")
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        try:
            turn = answer(engine, tokenizer, messages, thinking=thinking, params=params, printer=printer)
        except ValueError as e:
            messages.pop()
            out.write(f"error: {e}\n")
            continue
        messages.append({"role": "assistant", "content": turn["content"],
                         "reasoning_content": turn["reasoning_content"], "tool_calls": turn["tool_calls"] or None})


def main(argv: list[str]) -> int:
    import argparse

    from .server import build

    p = argparse.ArgumentParser(prog="dsv32 chat", description="chat with a dsv32 checkpoint in the terminal")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--thinking", action="store_true", help="start in thinking mode (toggle with /think)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-len", type=int, help="context (default: the model's max_seq_len)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    engine, tok = build(args.model, max_batch=1, max_len=args.max_len, device=args.device)
    repl(engine, tok, thinking=args.thinking, system=args.system, temperature=args.temperature, top_p=args.top_p,
         max_tokens=args.max_tokens)
    return 0
