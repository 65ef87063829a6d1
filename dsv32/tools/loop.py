"""The tool-calling loop: generate an assistant turn, parse it, run its tool calls, append the results, repeat
until the model answers without calling a tool (or `max_turns` generations, or a truncated turn).

The next prompt is the previous prompt + the model's exact continuation + the tool outputs + the assistant
opener, never a re-rendering, so every token the model wrote stays in place for RL. For well-formed turns
this text equals `chat.render(transcript, add_generation_prompt=False)`; reasoning stays in context across the
tool rounds (V3.2's rule: it is dropped only at a new user message, rl-distill-anchors.md §1.6).

    transcript = run_tool_loop(lambda prompt: engine_text(prompt), [{"role": "user", "content": "6*7?"}],
                               default_registry(), thinking=True)
    transcript[-1]["content"], transcript.stop_reason, transcript.segments   # answer, "answer", [(text, generated)]
"""

from __future__ import annotations

from typing import Any, Callable

from ..data.chat import assistant_open, parse_assistant, render, tool_outputs_text
from .registry import ToolRegistry


class Transcript(list):
    """The conversation as message dicts (inputs, generated assistant turns marked `"generated": True`, tool
    results), plus what RL needs:
    - `text`: everything the model saw and wrote, in order (starts with the BOS string);
    - `segments`: `text` cut into (piece, generated?) pairs, the generated pieces exactly as generate_fn returned;
    - `turns`: per generation {"prompt", "completion", "output" (generate_fn's raw return, e.g. token ids and
      log-probs), "parsed", "tool_results"};
    - `stop_reason`: "answer" | "max_turns" | "truncated".
    """

    def __init__(self, messages: list[dict]):
        super().__init__(messages)
        self.segments: list[tuple[str, bool]] = []
        self.turns: list[dict] = []
        self.stop_reason = ""

    @property
    def text(self) -> str:
        return "".join(piece for piece, _ in self.segments)

    @property
    def n_tool_calls(self) -> int:
        return sum(len(t["parsed"]["tool_calls"]) for t in self.turns if t["tool_results"])

    @property
    def well_formed(self) -> bool:
        return all(t["parsed"]["well_formed"] for t in self.turns)


def _completion_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    text = output.get("text") if isinstance(output, dict) else getattr(output, "text", None)
    if not isinstance(text, str):
        raise TypeError(f"run_tool_loop: generate_fn must return the continuation as a str (or an object with a "
                        f"str `.text`), got {type(output).__name__}")
    return text


def run_tool_loop(generate_fn: Callable[[str], Any], messages: list[dict], registry: ToolRegistry, *,
                  thinking: bool, max_turns: int = 4, show_tools: bool = True) -> Transcript:
    """Run the conversation to a final answer. `generate_fn(prompt_text)` returns the continuation, including
    the end-of-sentence token when the model stopped (without it the turn counts as truncated and the loop
    ends). Tool errors become tool messages; only `generate_fn`'s own exceptions propagate.
    `show_tools=False` leaves the schemas out of the system prompt (for models trained without them)."""
    if max_turns < 1:
        raise ValueError(f"run_tool_loop: max_turns must be at least 1, got {max_turns}")
    tools = registry.schemas() if show_tools else None
    transcript = Transcript([dict(m) for m in messages])
    prompt = render(transcript, thinking=thinking, tools=tools)
    transcript.segments.append((prompt, False))
    for turn in range(max_turns):
        output = generate_fn(prompt)
        completion = _completion_text(output)
        parsed = parse_assistant(completion, thinking=thinking, id_prefix=f"call_{turn}_")
        record = {"prompt": prompt, "completion": completion, "output": output, "parsed": parsed,
                  "tool_results": []}
        transcript.turns.append(record)
        transcript.segments.append((completion, True))
        transcript.append({"role": "assistant", "content": parsed["content"],
                           "reasoning_content": parsed["reasoning_content"],
                           "tool_calls": parsed["tool_calls"] or None, "generated": True})
        if not parsed["finished"]:
            transcript.stop_reason = "truncated"
            break
        if not parsed["tool_calls"]:
            transcript.stop_reason = "answer"
            break
        if turn == max_turns - 1:
            transcript.stop_reason = "max_turns"
            break
        for call in parsed["tool_calls"]:
            result = registry.call(call["function"]["name"], call["function"]["arguments"])
            record["tool_results"].append(result)
            transcript.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                               "content": result.content, "error": result.error})
        piece = tool_outputs_text([r.content for r in record["tool_results"]]) + assistant_open(thinking)
        transcript.segments.append((piece, False))
        prompt = prompt + completion + piece
    return transcript
