"""GRPO rollouts through the serving engine (the one sampler), and their token-level training record.

    samples = rollout(engine, tok, tasks, group_size=8, params=SamplingParams(temperature=1.0, max_tokens=64),
                      thinking=True)
    batch = collate(samples, vocab_size=model.cfg.vocab_size, device=device)

Each task is rendered with the chat template (`dsv32.data.chat`) and sampled `group_size` times; the copies
share `uid` (GRPO's group). A completion that calls tools (tool tasks) runs the tool loop: the calls are
executed (`tasks.call_tool`), their outputs and the next assistant opener are appended, and generation
continues, up to `max_turns` model turns (the V3.2 rule: reasoning stays across tool turns, §1.6). The
record keeps what the trainer replays (rl-distill-anchors.md §1.5):

    ids            prompt + every model turn + tool outputs (one sequence)
    gen_mask       1 on tokens the model generated (its loss mask), 0 on the prompt, tool outputs, openers
    sampler_logps  the engine's log-prob of each generated token (OPSM's π_old, V3.2 Eq. 9)
    kept           per model turn, the Keep Sampling Mask sets of its tokens (None: nothing was truncated)
    routes         per layer, the expert ids of every input position (Keep Routing), [len(ids) − 1, k]

Legend: B samples, T = longest sequence − 1 (inputs), V vocabulary, k experts per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..data.chat import assistant_open, encode_prompt, parse_assistant, reasoning_marker_ids, tool_outputs_text
from ..serve.sampling import SamplingParams
from . import tasks as T


@dataclass
class Sample:
    uid: int
    task: T.Task
    thinking: bool
    ids: list[int]
    prompt_len: int
    gen_mask: list[int]
    sampler_logps: list[float]
    kept: list[tuple[int, object]] = field(default_factory=list)   # (position of the turn's first token, KeptSets)
    routes: list | None = None                                      # per layer: LongTensor [len(ids) − 1, k] or None
    text: str = ""                 # the last model turn, decoded with its special tokens (what rewards read)
    transcript: list[dict] = field(default_factory=list)
    truncated: bool = False
    turns: int = 0
    reward: float | None = None
    components: dict = field(default_factory=dict)
    token_adv: list[float] | None = None   # process supervision: an advantage per position of `ids` (0 off the turns)
    banned_argmax: int = 0   # non-thinking: tokens where the model's own first choice was a reasoning marker

    @property
    def n_generated(self) -> int:
        return sum(self.gen_mask)


def task_prompt(task: T.Task, tokenizer, thinking: bool) -> list[int]:
    """The chat-template prompt of a task (tools offered when the task has any), BOS included."""
    return encode_prompt([{"role": "user", "content": task.prompt}], tokenizer, thinking=thinking,
                         tools=T.tools_for(task))


def safe_decode(tokenizer, ids: list[int]) -> str:
    """Decode, with ids beyond the tokenizer (a model vocabulary can be larger) shown as U+FFFD: sampling can
    draw them, and the rewards must see garbage, not crash."""
    n = tokenizer.vocab_size
    if all(t < n for t in ids):
        return tokenizer.decode(ids)
    pieces, run = [], []
    for t in ids:
        if t < n:
            run.append(t)
        else:
            pieces += [tokenizer.decode(run), "\ufffd"]
            run = []
    return "".join(pieces) + tokenizer.decode(run)


def _run_calls(calls: list[dict]) -> list[str]:
    return [T.call_tool(c["function"]["name"], c["function"].get("arguments", "{}")) for c in calls]


def rollout(engine, tokenizer, tasks: list[T.Task], *, group_size: int, params: SamplingParams,
            thinking: bool | list[bool], max_turns: int = 3) -> list[Sample]:
    """`group_size` samples per task (uid = the task's index), tool loop included; samples in task order.
    `thinking` is one mode for all tasks or one per task."""
    if group_size < 1 or max_turns < 1:
        raise ValueError(f"rollout: group_size={group_size} and max_turns={max_turns} must be >= 1")
    modes = [thinking] * len(tasks) if isinstance(thinking, bool) else list(thinking)
    if len(modes) != len(tasks):
        raise ValueError(f"rollout: {len(modes)} thinking flags for {len(tasks)} tasks; give one, or one per task")
    want_routes = params.return_routes
    # a non-thinking turn never samples <think> or </think> (its opener closed the reasoning; V3.2's mode contract)
    by_mode = {True: params, False: params.banning(reasoning_marker_ids(tokenizer))}
    samples = []
    for uid, (task, mode) in enumerate(zip(tasks, modes)):
        prompt = task_prompt(task, tokenizer, mode)
        for _ in range(group_size):
            samples.append(Sample(uid, task, mode, list(prompt), len(prompt), [0] * len(prompt),
                                  [0.0] * len(prompt), routes=[] if want_routes else None,
                                  transcript=[{"role": "user", "content": task.prompt}]))
    active = list(samples)
    for turn in range(max_turns):
        if not active:
            break
        outs = engine.generate([s.ids for s in active], [by_mode[s.thinking] for s in active])
        still = []
        for s, c in zip(active, outs):
            start = len(s.ids)
            s.ids += c.token_ids
            s.gen_mask += [1] * len(c.token_ids)
            s.sampler_logps += c.logprobs if c.logprobs is not None else [0.0] * len(c.token_ids)
            if c.kept is not None:
                s.kept.append((start, c.kept))
            if want_routes:
                s.routes.append(c.routes)
            s.turns += 1
            s.truncated |= c.truncated
            s.banned_argmax += c.banned_argmax
            s.text = safe_decode(tokenizer, c.token_ids)
            msg = parse_assistant(s.text, thinking=s.thinking)
            s.transcript.append({"role": "assistant", "content": msg["content"],
                                 "reasoning_content": msg["reasoning_content"], "tool_calls": msg["tool_calls"]})
            if msg["tool_calls"] and task_has_tools(s.task) and not c.truncated and turn + 1 < max_turns:
                outputs = _run_calls(msg["tool_calls"])
                s.transcript += [{"role": "tool", "tool_call_id": tc["id"], "content": out}
                                 for tc, out in zip(msg["tool_calls"], outputs)]
                more = tokenizer.encode(tool_outputs_text(outputs) + assistant_open(s.thinking))
                if len(s.ids) + len(more) + 1 >= engine.max_len:
                    s.truncated = True       # no room for another turn: the context limit cut it
                    continue
                s.ids += more
                s.gen_mask += [0] * len(more)
                s.sampler_logps += [0.0] * len(more)
                still.append(s)
        active = still
    if want_routes:
        for s in samples:
            s.routes = _join_routes(s.routes, len(s.ids) - 1)
    return samples


def task_has_tools(task: T.Task) -> bool:
    return bool(task.meta.get("tools"))


def _join_routes(turns: list[list], n_inputs: int) -> list | None:
    """Routes per layer over every input position: each turn contributes the rows from where the previous
    turn's record stopped (turn 1 covers the prompt; later turns cover the tool outputs and their tokens)."""
    if not turns:
        return None
    out = []
    for layer in range(len(turns[0])):
        if turns[0][layer] is None:
            out.append(None)
            continue
        pieces, pos = [], 0
        for routes in turns:
            r = routes[layer]
            pieces.append(r[pos:])
            pos = r.shape[0]
        joined = torch.cat(pieces)
        assert joined.shape[0] == n_inputs, (joined.shape, n_inputs)
        out.append(joined)
    return out


def collate(samples: list[Sample], vocab_size: int, device, temperature: float = 1.0) -> dict:
    """Right-padded training tensors for a list of samples:

    input_ids [B, T], targets [B, T] (next tokens), mask [B, T] (1 where the target was generated),
    sampler_logps [B, T], kept [B, T, V] bool or None, routes per layer [B, T, k] or None, adv [B, T] (the
    samples' `token_adv`) or None.
    """
    B = len(samples)
    T_ = max(len(s.ids) for s in samples) - 1
    ids = torch.zeros(B, T_ + 1, dtype=torch.long)
    mask = torch.zeros(B, T_ + 1)
    samp = torch.zeros(B, T_ + 1)
    adv = torch.zeros(B, T_ + 1) if all(s.token_adv is not None for s in samples) else None
    for b, s in enumerate(samples):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids)
        mask[b, :n] = torch.tensor(s.gen_mask, dtype=torch.float)
        samp[b, :n] = torch.tensor(s.sampler_logps)
        if adv is not None:
            adv[b, :n] = torch.tensor(s.token_adv)
    kept = None
    if any(s.kept for s in samples):
        kept = torch.ones(B, T_ + 1, vocab_size, dtype=torch.bool)
        for b, s in enumerate(samples):
            for start, ks in s.kept:
                m = ks.mask()
                kept[b, start:start + m.shape[0], : m.shape[1]] = m
                kept[b, start:start + m.shape[0], m.shape[1]:] = False
        kept = kept[:, 1:].to(device)
    routes = None
    if samples[0].routes is not None:
        routes = []
        for layer, r0 in enumerate(samples[0].routes):
            if r0 is None:
                routes.append(None)
                continue
            k = r0.shape[1]
            r_BTk = torch.arange(k).expand(B, T_, k).clone()   # padding: any valid experts (never in the loss)
            for b, s in enumerate(samples):
                r = s.routes[layer]
                r_BTk[b, : r.shape[0]] = r
            routes.append(r_BTk.to(device))
    return {"input_ids": ids[:, :-1].to(device), "targets": ids[:, 1:].to(device), "mask": mask[:, 1:].to(device),
            "sampler_logps": samp[:, 1:].to(device), "kept": kept, "routes": routes, "temperature": temperature,
            "adv": None if adv is None else adv[:, 1:].to(device)}


def transcript_json(sample: Sample) -> str:
    """The conversation of a sample as JSON (for logs and completion tables)."""
    return json.dumps(sample.transcript, ensure_ascii=False)
