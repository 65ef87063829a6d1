"""DeepSeek-V3.2 chat template on the ByteTokenizer's specials: render, training masks, parsing, streaming.

The layout follows V3.2's `encoding/encoding_dsv32.py` (thinking switch, reasoning-drop rule, BOS and system at
the start, EOS closing every assistant turn); its DSML tool-call markup is replaced by the V3/V3.1 tool special
tokens our tokenizer has. One conversation renders as (no newlines are added between pieces):

    <｜begin▁of▁sentence｜>{system}\\n\\n{tools block}
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{json arguments}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
        <｜end▁of▁sentence｜>
    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>
    <｜Assistant｜><think>{reasoning}</think>{final answer}<｜end▁of▁sentence｜>

Rules (V3.2 paper §3.2, rl-distill-anchors.md §1.6, §4.4):
- Thinking turns open with `<｜Assistant｜><think>` and the model closes its reasoning with `</think>`;
  non-thinking turns open with `<｜Assistant｜></think>`. The opener is prompt (loss mask 0); everything after it up
  to and including EOS is the model's (mask 1), so `</think>` is learned only where the model wrote it.
- Reasoning is dropped only at a new user message: assistant turns before the last user message render as
  non-thinking turns (`</think>content`), turns after it keep their reasoning across any number of tool rounds.
- Differences from V3.2: V3.2 appends tool results as plain text inside the assistant turn and reopens with
  `<think>`; here they sit in the tool-output specials and the next assistant segment reopens with the same
  `<｜Assistant｜><think>` as every other turn, so a generation prompt always ends with the opener.
- Special-token strings inside free text (user, system, tool output, reasoning, content) are neutralised to
  `&lt;...` (`escape_specials`) so text can never forge template structure.

`render` returns the text with the BOS string: encode it with `add_bos=False` (or use `encode_prompt`).
`parse_assistant` never raises on model output; anything off-grammar sets `well_formed=False` and is listed in
`problems`; output without the final EOS is `finished=False` (truncated), hence not well formed either.
"""

from __future__ import annotations

import json
import re

from .tokenizer import ASSISTANT, BOS, EOS, SPECIALS, THINK_BEGIN, THINK_END, USER

CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, CALL_SEP = SPECIALS[6:11]
OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END = SPECIALS[11:15]
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in sorted(SPECIALS, key=len, reverse=True)))

TOOLS_TEMPLATE = (
    "## Tools\nYou can call the tools below. To call tools, end your reply with\n"
    f"{CALLS_BEGIN}{CALL_BEGIN}NAME{CALL_SEP}{{JSON object of arguments}}{CALL_END}{CALLS_END}\n"
    f"with one {CALL_BEGIN}...{CALL_END} per call. Results come back between {OUTPUTS_BEGIN} and {OUTPUTS_END}.\n"
    "### Available tools\n{schemas}")


def escape_specials(text: str) -> str:
    """Neutralise special-token strings in free text (`<｜User｜>` -> `&lt;｜User｜>`); idempotent."""
    return _SPECIAL_RE.sub(lambda m: "&lt;" + m.group(0)[1:], text)


def assistant_open(thinking: bool) -> str:
    """The generation prompt of an assistant segment."""
    return ASSISTANT + (THINK_BEGIN if thinking else THINK_END)


def tool_outputs_text(contents: list[str]) -> str:
    """One block of tool results (all results answering one assistant turn, in call order)."""
    body = "".join(OUTPUT_BEGIN + escape_specials(c) + OUTPUT_END for c in contents)
    return OUTPUTS_BEGIN + body + OUTPUTS_END


def tools_block(tools: list[dict]) -> str:
    """The system-prompt section describing the tools (OpenAI-style schemas, one JSON object per line)."""
    lines = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                             f"'description': ..., 'parameters': {{...}}}}}} (OpenAI format), got {tool!r}")
        lines.append(json.dumps(fn, ensure_ascii=False))
    return TOOLS_TEMPLATE.replace("{schemas}", escape_specials("\n".join(lines)))


def _text(value, where: str) -> str:
    """Message text: a string, None, or OpenAI content parts of type text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise ValueError(f"{where}: expected a string or a list of {{'type': 'text', 'text': ...}} parts, "
                     f"got {type(value).__name__}")


def _arguments(call: dict, where: str) -> tuple[str, str]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: a tool call is {{'id', 'type': 'function', 'function': {{'name': str, "
                         f"'arguments': '<json>'}}}}, got {call!r}")
    args = fn.get("arguments", "{}")
    return fn["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _segments(messages: list[dict], thinking: bool, tools: list[dict] | None,
              add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The conversation as (text, model-generated?) pieces; every flip of the flag sits on a special token."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}]: role must be system, developer, user, assistant or tool, got "
                             f"{m.get('role') if isinstance(m, dict) else m!r}")
        roles.append("system" if m["role"] == "developer" else m["role"])
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=-1)

    n_sys = 0
    while n_sys < len(roles) and roles[n_sys] == "system":
        n_sys += 1
    system = "\n\n".join(escape_specials(_text(messages[i].get("content"), f"messages[{i}].content"))
                         for i in range(n_sys))
    if tools:
        system = (system + "\n\n" if system else "") + tools_block(tools)
    out: list[tuple[str, bool]] = [(BOS + system, False)]

    calls: list[str] = []   # ids of the pending tool calls (for checking tool_call_id)
    n_pending = 0
    for i in range(n_sys, len(messages)):
        m, role, where = messages[i], roles[i], f"messages[{i}]"
        if role == "system":
            raise ValueError(f"{where}: system messages must come first; move it to the start")
        if role == "user":
            out.append((USER + escape_specials(_text(m.get("content"), where + ".content")), False))
        elif role == "tool":
            if roles[i - 1] not in ("assistant", "tool") or n_pending == 0:
                raise ValueError(f"{where}: a tool message must answer a tool call of the assistant message "
                                 "before it (more tool results than calls?)")
            tid = m.get("tool_call_id")
            if tid and any(calls) and tid not in calls:
                raise ValueError(f"{where}.tool_call_id: {tid!r} matches none of the calls {calls}")
            n_pending -= 1
            opening = OUTPUTS_BEGIN if roles[i - 1] == "assistant" else ""
            closing = OUTPUTS_END if i + 1 == len(messages) or roles[i + 1] != "tool" else ""
            content = escape_specials(_text(m.get("content"), where + ".content"))
            out.append((opening + OUTPUT_BEGIN + content + OUTPUT_END + closing, False))
        else:  # assistant
            if i == n_sys or roles[i - 1] not in ("user", "tool"):
                raise ValueError(f"{where}: an assistant message must follow a user or tool message")
            think = thinking and i > last_user
            out.append((assistant_open(think), False))
            text = ""
            if think:
                text += escape_specials(_text(m.get("reasoning_content"), where + ".reasoning_content")) + THINK_END
            text += escape_specials(_text(m.get("content"), where + ".content"))
            tool_calls = m.get("tool_calls") or []
            if tool_calls:
                parts = [_arguments(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(tool_calls)]
                text += CALLS_BEGIN + "".join(CALL_BEGIN + escape_specials(n) + CALL_SEP + escape_specials(a)
                                              + CALL_END for n, a in parts) + CALLS_END
            calls = [c.get("id") or "" for c in tool_calls]
            n_pending = len(tool_calls)
            out.append((text + EOS, True))
    if add_generation_prompt:
        if roles[-1] == "assistant":
            raise ValueError("render: the conversation already ends with an assistant message; pass "
                             "add_generation_prompt=False to render it whole (e.g. for training)")
        out.append((assistant_open(thinking), False))
    return out


def render(messages: list[dict], *, thinking: bool, tools: list[dict] | None = None,
           add_generation_prompt: bool = True) -> str:
    """The conversation as one string (with BOS); the generation prompt ends with the assistant opener."""
    return "".join(t for t, _ in _segments(messages, thinking, tools, add_generation_prompt))


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "special_to_id"):  # ByteTokenizer: specials are recognised in the text
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)  # Hugging Face tokenizers


def reasoning_marker_ids(tokenizer) -> tuple[int, ...]:
    """The ids of `<think>` and `</think>` (each one token in dsv32's and V3.2's tokenizers). A non-thinking turn
    bans them when it samples (`SamplingParams.banning`): its opener already closed the reasoning, so its reply
    holds no reasoning block by construction."""
    ids = [tokenizer.encode(m) for m in (THINK_BEGIN, THINK_END)]
    return tuple(i[0] for i in ids if len(i) == 1)


def encode_prompt(messages: list[dict], tokenizer, *, thinking: bool, tools: list[dict] | None = None) -> list[int]:
    """Token ids of `render(...)` with the generation prompt (BOS included once)."""
    return _encode(tokenizer, render(messages, thinking=thinking, tools=tools))


def encode_for_training(messages: list[dict], tokenizer, *, thinking: bool, tools: list[dict] | None = None,
                        mask_history: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of the whole conversation: mask 1 on what the assistant wrote (reasoning, `</think>`,
    content, tool calls, EOS), 0 on BOS, system, tools, user text, openers and tool outputs. With
    `mask_history`, only assistant turns after the last user message are trained."""
    segments = _segments(messages, thinking, tools, add_generation_prompt=False)
    if mask_history:
        n_user = sum(1 for m in messages if m.get("role") == "user")
        seen, kept = 0, []
        for text, trained in segments:
            seen += text.startswith(USER)
            kept.append((text, trained and seen == n_user))
        segments = kept
    merged: list[tuple[str, bool]] = []   # adjacent pieces with one flag are encoded together
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    ids, mask = [], []
    for text, trained in merged:
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


class StreamParser:
    """Incremental parser of a generated assistant continuation (the text after the generation prompt).

    `feed(piece)` returns new events: ("reasoning", text), ("content", text) or ("tool_call", json of an OpenAI
    tool call {"id", "type", "function": {"name", "arguments"}}) once the call is complete. A tail that could be
    the start of a special token is held back until the next piece or `finish()`; `result()` is the parse.
    """

    def __init__(self, *, thinking: bool, id_prefix: str = "call_"):
        self.thinking, self.id_prefix = thinking, id_prefix
        self.state = "reasoning" if thinking else "content"
        self.buf, self.at_start = "", True
        self.reasoning, self.content, self.calls, self.problems = [], [], [], []
        self.name, self.args, self.finished, self.saw_reasoning = "", "", False, thinking

    def _problem(self, what: str) -> None:
        if what not in self.problems:
            self.problems.append(what)

    def _text(self, text: str, events: list) -> None:
        if not text:
            return
        self.at_start = False
        if self.state in ("reasoning", "content"):
            (self.reasoning if self.state == "reasoning" else self.content).append(text)
            events.append((self.state, text))
        elif self.state == "name":
            self.name += text
        elif self.state == "args":
            self.args += text
        else:
            self._problem({"calls": "text between tool calls", "after_calls": "text after the tool calls (only EOS "
                           "may follow)"}.get(self.state, "text after the end-of-sentence token"))

    def _special(self, tok: str, events: list) -> None:
        start, self.at_start = self.at_start, False
        s = self.state
        if s == "done":
            self._problem("text after the end-of-sentence token")
        elif tok == EOS:
            if s in ("reasoning", "name", "args", "calls"):
                self._problem({"reasoning": "no </think> before the end of the turn",
                               "calls": "tool calls not closed"}.get(s, "tool call cut off"))
            self.finished, self.state = True, "done"
        elif s == "reasoning" and tok == THINK_END:
            self.state = "content"
        elif start and tok == THINK_BEGIN and self.thinking:
            self._problem("duplicated <think> (the prompt already opened the reasoning)")
            self.at_start = True
        elif start and tok == THINK_END and not self.thinking:
            self._problem("duplicated </think> (the prompt already closed the reasoning)")
            self.at_start = True
        elif start and tok == THINK_BEGIN:
            self._problem("reasoning in non-thinking mode")
            self.state, self.saw_reasoning = "reasoning", True
        elif s == "content" and tok == CALLS_BEGIN:
            self.state = "calls"
        elif s == "calls" and tok == CALL_BEGIN:
            self.state, self.name, self.args = "name", "", ""
        elif s == "calls" and tok == CALLS_END:
            self.state = "after_calls"
        elif s == "name" and tok == CALL_SEP:
            self.state = "args"
        elif s == "args" and tok == CALL_END:
            self._finish_call(events)
        else:
            self._problem(f"unexpected {tok} in {s}")
            if s in ("reasoning", "content"):
                self._text(tok, events)

    def _finish_call(self, events: list) -> None:
        try:
            ok = isinstance(json.loads(self.args), dict)
        except ValueError:
            ok = False
        if not ok:
            self._problem(f"arguments of {self.name!r} are not a JSON object")
        call = {"id": f"{self.id_prefix}{len(self.calls)}", "type": "function",
                "function": {"name": self.name, "arguments": self.args}}
        self.calls.append(call)
        events.append(("tool_call", json.dumps(call, ensure_ascii=False)))
        self.state = "calls"

    def feed(self, piece: str) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        self.buf += piece
        while True:
            m = _SPECIAL_RE.search(self.buf)
            if m is None:
                break
            self._text(self.buf[:m.start()], events)
            self.buf = self.buf[m.end():]
            self._special(m.group(0), events)
        cut = self.buf.rfind("<")   # hold back a tail that may be the start of a special token
        if cut >= 0 and any(s.startswith(self.buf[cut:]) for s in SPECIALS):
            self._text(self.buf[:cut], events)
            self.buf = self.buf[cut:]
        else:
            self._text(self.buf, events)
            self.buf = ""
        return events

    def finish(self) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        self._text(self.buf, events)
        self.buf = ""
        if not self.finished:
            self._problem("no end-of-sentence token (truncated)")
        return events

    def result(self) -> dict:
        return {"content": "".join(self.content),
                "reasoning_content": "".join(self.reasoning) if self.saw_reasoning else None,
                "tool_calls": list(self.calls), "well_formed": not self.problems, "finished": self.finished,
                "problems": list(self.problems)}


def parse_assistant(text: str, *, thinking: bool, id_prefix: str = "call_") -> dict:
    """Generated continuation -> {"content", "reasoning_content", "tool_calls", "well_formed", "finished",
    "problems"}; the inverse of rendering one assistant turn. Never raises on model output."""
    parser = StreamParser(thinking=thinking, id_prefix=id_prefix)
    parser.feed(text if isinstance(text, str) else str(text))
    parser.finish()
    return parser.result()
