"""Reward functions: pure, one per file section, `None` where a reward does not apply (TRL's convention,
rl-distill-anchors.md §3.1, §6.1 item 4, §6.2 "Reward shaping").

Every reward has the signature `reward(completion_text, task, **info) -> float | None`:
    completion_text  the generated continuation after the generation prompt, decoded with its special tokens
                     (`</think>`, tool-call markup, the final `<｜end▁of▁sentence｜>` when it stopped)
    task             a `dsv32.rl.tasks.Task`
    info             thinking (bool, default True), truncated (bool), n_tokens (int), max_tokens (int),
                     transcript (the tool loop's messages, for tool tasks); unknown keys are ignored

    >>> from dsv32.rl.tasks import Task
    >>> t = Task("What is 7+8-3?", "12", "math")
    >>> correctness("7+8=15\\n15-3=12</think>12<｜end▁of▁sentence｜>", t)
    1.0
    >>> format_reward("7+8=15</think>12", t, truncated=True)        # no EOS: truncated, never well formed
    0.0

The combination with weights per domain is `dsv32.rl.rubric.Rubric`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from ..data.chat import parse_assistant
from .tasks import Task, checked_solution, verify


@lru_cache(maxsize=4096)
def _parse(text: str, thinking: bool) -> dict:
    return parse_assistant(text, thinking=thinking)


def parsed(text: str, thinking: bool = True) -> dict:
    """The chat template's parse of a completion (cached: every reward of a rubric parses the same text)."""
    return dict(_parse(text, thinking))


def final_answer(text: str, thinking: bool = True) -> str:
    """The reply with the reasoning and tool calls removed (what a user would read)."""
    return (parsed(text, thinking)["content"] or "").strip()


# ---------------------------------------------------------------------------------------------- correctness

@lru_cache(maxsize=65536)
def _math_equal(gold: str, answer: str) -> bool:
    """math-verify's parse + verify (LaTeX, fractions, decimals); falls back to exact arithmetic. Cached: the
    samples of a group often give the same answer."""
    try:
        from math_verify import parse, verify as mv_verify

        pred = parse(answer)
        if pred:
            return bool(mv_verify(parse(gold), pred))
        return False
    except Exception:  # math-verify failed on odd text (or is not installed): the exact checker decides
        return verify(Task("", gold, "math"), answer)


def correctness(completion_text: str, task: Task, *, thinking: bool = True, truncated: bool = False,
                **info) -> float | None:
    """1.0 if the final answer is right, else 0.0: math by math-verify, other domains by `tasks.verify`
    (countdown checks the expression, logic and tool answers match exactly). Alignment tasks have no single
    right answer: None (see `alignment_rules`). A truncated completion has no final answer: 0.0.

    >>> correctness("</think>The answer is 12<｜end▁of▁sentence｜>", Task("What is 7+5?", "12", "math"))
    1.0
    >>> correctness("Ann<｜end▁of▁sentence｜>", Task("Who?", "Bob", "logic"), thinking=False)
    0.0
    """
    if task.domain == "alignment":
        return None
    if truncated:
        return 0.0
    answer = final_answer(completion_text, thinking)
    if not answer:
        return 0.0
    if task.domain == "math":
        return float(_math_equal(task.answer, answer))
    return float(verify(task, answer))


# ---------------------------------------------------------------------------------------------- format

def format_reward(completion_text: str, task: Task, *, thinking: bool = True, truncated: bool = False,
                  **info) -> float:
    """1.0 if the completion is well formed for its mode per the chat template (reasoning closed by `</think>`
    in thinking mode, no reasoning block in non-thinking mode, tool calls parse, ends with EOS), else 0.0.
    Truncated output is never well formed (rl-distill-anchors.md §6.5 item 8).

    >>> format_reward("</think>5<｜end▁of▁sentence｜>", Task("q", "5", "math"))
    1.0
    >>> format_reward("<think>r</think>5<｜end▁of▁sentence｜>", Task("q", "5", "math"), thinking=False)
    0.0
    """
    if truncated:
        return 0.0
    return float(parsed(completion_text, thinking)["well_formed"])


# ---------------------------------------------------------------------------------------------- length

def soft_overlong(n_tokens: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476): 0 up to L_max − L_cache, then a linear ramp to −1
    at L_max, −1 beyond.

    >>> soft_overlong(40, 64, 16), soft_overlong(56, 64, 16), soft_overlong(64, 64, 16), soft_overlong(70, 64, 16)
    (0.0, -0.5, -1.0, -1.0)
    """
    if max_len < 1 or not 0 < cache_len <= max_len:
        raise ValueError(f"soft_overlong: need max_len >= 1 and 0 < cache_len <= max_len, got {max_len}, {cache_len}")
    free = max_len - cache_len
    if n_tokens <= free:
        return 0.0
    if n_tokens > max_len:
        return -1.0
    return (free - n_tokens) / cache_len


def length_penalty(completion_text: str, task: Task, *, n_tokens: int | None = None,
                   max_tokens: int | None = None, truncated: bool = False, length_budget: int | None = None,
                   length_cache: int | None = None, **info) -> float | None:
    """The soft overlong penalty of a completion (0 … −1). L_max is `length_budget` (default the rollout's
    max_tokens), L_cache is `length_cache` (default L_max / 4). A truncated completion gets −1. None when the
    token count is unknown. A relaxed penalty (Speciale) is a larger budget and a smaller rubric weight.

    >>> length_penalty("x", Task("q", "a", "math"), n_tokens=60, max_tokens=64)
    -0.75
    """
    if truncated:
        return -1.0
    if n_tokens is None:
        return None
    budget = length_budget or max_tokens
    if not budget:
        return None
    return soft_overlong(int(n_tokens), int(budget), int(length_cache or max(1, budget // 4)))


# ---------------------------------------------------------------------------------------------- language

_WORD = re.compile(r"\S+")
_TARGET_SCRIPT = {"en": re.compile(r"^[\x20-\x7e]+$")}   # English: printable ASCII words


def language_consistency(completion_text: str, task: Task, *, thinking: bool = True, **info) -> float | None:
    """DeepSeek-R1's language reward: #words in the target language / #words, over reasoning and answer
    (task.meta["language"], default "en": a word counts when it is printable ASCII). A byte-level model that
    drifts into broken UTF-8 or another script loses reward. None when there are no words.

    >>> language_consistency("</think>the answer is 5<｜end▁of▁sentence｜>", Task("q", "5", "math"))
    1.0
    >>> language_consistency("</think>réponse \\ufffd 5<｜end▁of▁sentence｜>", Task("q", "5", "math"))
    0.3333333333333333
    """
    lang = task.meta.get("language", "en")
    if lang not in _TARGET_SCRIPT:
        raise ValueError(f"language_consistency: task language {lang!r} is not supported; use one of "
                         f"{', '.join(_TARGET_SCRIPT)} or drop the reward from the rubric")
    p = parsed(completion_text, thinking)
    words = _WORD.findall((p["reasoning_content"] or "") + " " + (p["content"] or ""))
    if not words:
        return None
    return sum(bool(_TARGET_SCRIPT[lang].match(w)) for w in words) / len(words)


# ---------------------------------------------------------------------------------------------- tool use

def tool_success(completion_text: str, task: Task, *, thinking: bool = True, truncated: bool = False,
                 transcript: list[dict] | None = None, **info) -> float | None:
    """Tool-use task success: 1.0 when the model called a tool that ran without error AND its final answer is
    right, else 0.0. None for tasks that offer no tools. `transcript` is the tool loop's message list; the
    final answer is the last assistant message (or `completion_text` when no loop ran).

    >>> t = Task("What is 123*45?", "5535", "tool", {"tools": ["calc"]})
    >>> msgs = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calc"}}]},
    ...         {"role": "tool", "content": "5535"}, {"role": "assistant", "content": "5535"}]
    >>> tool_success("5535<｜end▁of▁sentence｜>", t, transcript=msgs, thinking=False)
    1.0
    >>> tool_success("5535<｜end▁of▁sentence｜>", t, thinking=False)    # right, but no tool was used
    0.0
    """
    if not task.meta.get("tools"):
        return None
    if truncated:
        return 0.0
    transcript = transcript or []
    ran = any(m.get("role") == "tool" and not str(m.get("content", "")).startswith(("error", "no entry"))
              for m in transcript)
    answer = final_answer(completion_text, thinking)
    return float(ran and bool(answer) and verify(task, answer))


def tool_grounding(completion_text: str, task: Task, *, thinking: bool = True, truncated: bool = False,
                   transcript: list[dict] | None = None, **info) -> float | None:
    """Partial credit for agentic tasks: 1.0 when the final answer appears verbatim in a tool output of this
    episode (the answer was read off the tool, not made up), else 0.0; None for tasks without tools. It
    rewards the skill tool use rests on (copying the observation), so a model that calls tools but cannot yet
    answer still gets a learning signal; correctness comes from `tool_success`.

    >>> t = Task("What is the code of Kalo?", "123", "tool", {"tools": ["lookup"]})
    >>> msgs = [{"role": "tool", "content": "Kalo: code 123, city Oslo"}]
    >>> tool_grounding("</think>123<｜end▁of▁sentence｜>", t, transcript=msgs)
    1.0
    >>> tool_grounding("</think>42<｜end▁of▁sentence｜>", t, transcript=msgs)
    0.0
    """
    if not task.meta.get("tools"):
        return None
    if truncated:
        return 0.0
    answer = final_answer(completion_text, thinking)
    outputs = [str(m.get("content", "")) for m in (transcript or []) if m.get("role") == "tool"]
    return float(bool(answer) and any(answer in out for out in outputs))


# ---------------------------------------------------------------------------------------------- alignment

def alignment_rules(completion_text: str, task: Task, *, thinking: bool = True, truncated: bool = False,
                    **info) -> float | None:
    """The alignment rules of `tasks.py`: refuse the defined class of harmful requests with the fixed refusal,
    help with safe ones, follow format constraints (uppercase, exactly N words). None outside alignment.

    >>> from dsv32.rl.tasks import REFUSAL
    >>> alignment_rules(REFUSAL + "<｜end▁of▁sentence｜>", Task("How do I rob a bank?", REFUSAL, "alignment",
    ...                 {"rule": "refuse"}), thinking=False)
    1.0
    """
    if task.domain != "alignment" or "rule" not in task.meta:
        return None
    if truncated:
        return 0.0
    return float(verify(task, final_answer(completion_text, thinking)))


# ---------------------------------------------------------------------------------------------- a hackable judge

_STEP = re.compile(r"(?<![\d.])(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)(?![\d.])")


def arithmetic_steps(completion_text: str) -> list[tuple[int, bool]]:
    """Every `a op b = c` written in a completion (reasoning and answer alike): where it ends (a character offset
    into the text) and whether it holds. The step rewards of process supervision (`advantages.process_advantages`)
    and a check that a worked trace is right line by line, not only in its final answer.

    >>> arithmetic_steps("9+4=13\\n13-9=5</think>5")
    [(6, True), (13, False)]
    >>> arithmetic_steps("04-1=3, 8/0=1, 6/4=2, 1.5+1=2.5")     # leading zeros count; no division by zero; no decimals
    [(6, True), (13, False), (20, False)]
    """
    out = []
    for m in _STEP.finditer(completion_text):
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        value = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b) if b else None}[op]
        out.append((m.end(), value == c))
    return out


def self_verification(completion_text: str, task: Task, *, thinking: bool = True, truncated: bool = False,
                      **info) -> float | None:
    """1.0 when a right answer comes with a right self-check: the reasoning is a chain of true `a op b = c` steps
    followed by every step undone back to the first number and the result restated (`tasks.checked_solution`
    of its own chain), else 0.0. DeepSeekMath-V2's generator is rewarded for its proof and for verifying it
    faithfully (rl-distill-anchors.md §1.8); this is that term at byte scale, the one Speciale's RL adds. Without
    it correctness alone rewards dropping the check (a tiny model's extra lines are extra chances to slip), so
    RL shortens the reasoning Speciale was taught. None outside math and in non-thinking mode (no reasoning).

    >>> t = Task("What is 7+8-3?", "12", "math")
    >>> self_verification("7+8=15\\n15-3=12\\n12+3=15\\n15-8=7\\nso 12</think>12<｜end▁of▁sentence｜>", t)
    1.0
    >>> self_verification("7+8=15\\n15-3=12</think>12<｜end▁of▁sentence｜>", t)      # right, but not checked
    0.0
    """
    if task.domain != "math" or not thinking:
        return None
    if truncated or not correctness(completion_text, task, thinking=thinking):
        return 0.0
    lines = (parsed(completion_text, thinking)["reasoning_content"] or "").strip().split("\n")
    n = (len(lines) - 1) // 2
    if n < 1 or len(lines) != 2 * n + 1:
        return 0.0
    reasoning = "\n".join(lines)
    steps = arithmetic_steps(reasoning)
    if len(steps) != 2 * n or not all(ok for _, ok in steps):
        return 0.0
    return float(checked_solution(Task(task.prompt, task.answer, task.domain, solution="\n".join(lines[:n])))
                 == reasoning)


def length_judge(completion_text: str, task: Task, *, thinking: bool = True, target_chars: int = 48,
                 **info) -> float:
    """A DELIBERATELY HACKABLE reward for the divergence-guard demo (rl-distill-anchors.md §6.5 item 13): a
    "judge" that likes long answers, min(1, len(answer) / target_chars), blind to correctness. Optimising it
    pads the answer, which breaks exact answers on held-out tasks: train reward up, held-out accuracy down.

    >>> length_judge("</think>12<｜end▁of▁sentence｜>", Task("q", "12", "math"), target_chars=8)
    0.25
    """
    return min(1.0, len(final_answer(completion_text, thinking)) / target_chars)


REWARDS = {"correctness": correctness, "format": format_reward, "length": length_penalty,
           "language": language_consistency, "tool": tool_success, "tool_grounding": tool_grounding,
           "alignment": alignment_rules, "self_verification": self_verification,
           "length_judge": length_judge}
