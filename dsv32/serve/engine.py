"""The generation engine: token ids in, token ids out, with continuous batching over the model's caches.

    engine = Engine(model, max_batch=32, eos_id=tok.eos_id, decode=tok.decode)
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0.7, top_p=0.9, logprobs=True))
    outs[0].token_ids, outs[0].logprobs, outs[0].finish_reason

    rid = engine.add_request(ids, params)      # the incremental API the server streams from
    for event in engine.step(): ...           # one decode step for every running request

How a step works. Running requests occupy rows 0..n-1 of one latent-KV / index-key cache, each at its own
length (a ragged cache: `Cache.lengths`). A step first feeds every running request its last sampled token
(one batched decode, each row at its own position), samples, and retires the finished ones, moving the
last row into the freed one so the running rows stay a prefix. Then waiting requests take the free rows:
their prompts are prefilled together (right-padded; causal attention never lets a real token see the
padding) into a view of those rows, and their first token is sampled. Requests thus join and leave a
running batch between any two steps. The cache grows by doubling, up to `max_len`.

The engine never copies the model: training updates the weights in place and the next step sees them.
It knows nothing about text beyond the optional `decode` function used for stop strings.

Legend: N running rows, P prompt length, V vocabulary, k experts per token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..model import Trace
from .sampling import KeptSets, SamplingParams, process_logits, sample


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token included (EOS is part of what RL trains on)
    logprobs: list[float] | None  # per generated token, under the processed (kept, renormalised) dist
    kept: KeptSets | None  # compact kept sets; `kept.mask()` is bool [len(token_ids), V]
    routes: list | None  # per layer (None for dense-MLP layers): LongTensor [P + G - 1, k], the routes of
    # every token the model ran on; replay with `model(ids[None, :-1], routes=[r[None] ...])`
    finish_reason: str  # "stop" | "length" | "abort"
    truncated: bool  # hit max_tokens or the context limit before a stop
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    request_id: int = -1
    banned_argmax: int = 0  # steps where the model's own top token was a banned one (what the ban changed)


@dataclass
class StepEvent:
    """What one `step()` produced for one request: its new token, and the completion once it finished."""

    request_id: int
    token_id: int
    completion: Completion | None = None


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kept: KeptSets | None = None
    routes: list[list[torch.Tensor]] | None = None  # per layer, chunks [n, k]
    cached: int = 0  # tokens in this request's cache row
    text_len: int = 0  # characters of decoded text already searched for stop strings
    banned_argmax: int = 0


class Engine:
    def __init__(self, model, *, max_batch: int = 32, max_len: int | None = None, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None, vocab_limit: int | None = None,
                 max_prefill_tokens: int = 8192):
        """max_len: context per request (default the model's max_seq_len); eos_id: always a stop token;
        decode: ids -> text, needed for stop strings; vocab_limit: sample only ids below it (the tokenizer's
        vocabulary when the model's embedding is padded past it; the kept sets then exclude those ids);
        max_prefill_tokens: padded prompt tokens prefilled together in one step (at least one request)."""
        if max_batch < 1:
            raise ValueError(f"Engine max_batch={max_batch} must be >= 1")
        limit = model.cfg.max_seq_len
        if max_len is not None and not 1 < max_len <= limit:
            raise ValueError(f"Engine max_len={max_len} must be in [2, the model's max_seq_len={limit}]")
        self.model, self.max_batch, self.max_len = model, max_batch, max_len or limit
        if vocab_limit is not None and not 0 < vocab_limit <= model.cfg.vocab_size:
            raise ValueError(f"Engine vocab_limit={vocab_limit} must be in [1, the model's vocab_size="
                             f"{model.cfg.vocab_size}]; is the tokenizer larger than the model's vocabulary?")
        self.eos_id, self.decode, self.max_prefill_tokens = eos_id, decode, max_prefill_tokens
        self.vocab_limit = vocab_limit
        self.cache = None
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []  # running[i] owns cache row i
        self._ids = itertools.count()
        self.peak_running = 0  # the most requests decoded together so far (observability, tests)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    # -- the incremental API ---------------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. Raises ValueError for a prompt that cannot run."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt: give at least one token (e.g. the BOS token)")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate within the context of "
                             f"{self.max_len} tokens; shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < (self.vocab_limit or self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_limit or self.vocab_size})")
        if any(t >= self.vocab_size for t in params.banned_token_ids):
            raise ValueError(f"banned_token_ids {params.banned_token_ids} reach past the vocabulary of "
                             f"{self.vocab_size} ids")
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a decode function: Engine(model, decode=tokenizer.decode)")
        dev = self._device()
        gen = None if params.seed is None else torch.Generator(device=dev).manual_seed(params.seed)
        req = _Request(next(self._ids), prompt, params, gen)
        if params.return_kept:
            req.kept = KeptSets(self.vocab_size)
        if params.return_routes:
            req.routes = [[] for _ in range(self.model.cfg.n_layers)]
        self.waiting.append(req)
        return req.rid

    def abort(self, request_id: int) -> Completion | None:
        """Stop a request now (e.g. its client went away); returns its partial completion."""
        for req in self.waiting:
            if req.rid == request_id:
                self.waiting.remove(req)
                return self._complete(req, "abort", False, None)
        for row, req in enumerate(self.running):
            if req.rid == request_id:
                self._release(row)
                return self._complete(req, "abort", False, None)
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self) -> None:
        """Give the KV cache's memory back while idle (e.g. to the trainer between rollouts); the next
        step allocates a new one."""
        if self.running:
            raise ValueError(f"{len(self.running)} requests are running; abort or finish them before release()")
        self.cache = None

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        """One decode step for every running request, then admit and prefill waiting ones."""
        events: list[StepEvent] = []
        if self.running:
            self._decode(events)
        if self.waiting and len(self.running) < self.max_batch:
            self._prefill(events)
        return events

    # -- batch generation and scoring ------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Generate for every prompt (continuous batching inside); completions in prompt order. It drives
        `step()` itself: other users of the incremental API would lose their events meanwhile."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise ValueError(f"{len(per)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per)]
        wanted, done = set(ids), {}
        while len(done) < len(ids):
            for ev in self.step():
                if ev.completion is not None and ev.request_id in wanted:
                    done[ev.request_id] = ev.completion
        return [done[i] for i in ids]

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[torch.Tensor]:
        """Teacher-forced log-probs (fp32, CPU) of each sequence's tokens after its prompt, from the raw
        softmax (no temperature, nothing truncated): [len(seq) - prompt_len] per sequence."""
        if len(sequences) != len(prompt_lens):
            raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
        for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
            if not 1 <= p <= len(seq) or len(seq) > self.model.cfg.max_seq_len:
                raise ValueError(f"sequence {i}: prompt_len={p} must be in [1, len={len(seq)}] and the sequence "
                                 f"at most max_seq_len={self.model.cfg.max_seq_len} tokens")
        dev = self._device()
        out: list[torch.Tensor | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
        for chunk in (order[i:i + self.max_batch] for i in range(0, len(order), self.max_batch)):
            T = max(len(sequences[i]) for i in chunk)
            ids_BT = torch.zeros(len(chunk), T, dtype=torch.long, device=dev)
            for b, i in enumerate(chunk):
                ids_BT[b, : len(sequences[i])] = torch.tensor(list(sequences[i]), device=dev)
            h_BTd = self.model.hidden(ids_BT)
            for b, i in enumerate(chunk):  # the LM head only where a scored token is predicted: [n - p, V]
                n, p = len(sequences[i]), prompt_lens[i]
                lp_tV = torch.log_softmax(self.model.head(h_BTd[b, p - 1:n - 1]).float(), dim=-1)
                out[i] = lp_tV.gather(1, ids_BT[b, p:n, None]).squeeze(1).cpu()
        return out

    # -- internals -------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ensure_cache(self, need: int) -> None:
        """A cache with room for `need` tokens per row: allocated lazily, doubled when outgrown."""
        p = next(self.model.parameters())
        stale = self.cache is not None and (self.cache.layers[0].kv.device != p.device
                                            or self.cache.layers[0].kv.dtype != p.dtype)
        if stale and not self.running:
            self.cache = None
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_batch, min(self.max_len, max(need, 256)))
        elif self.cache.max_len < need:
            self.cache = self.cache.resized(min(self.max_len, max(need, 2 * self.cache.max_len)))

    def _decode(self, events: list[StepEvent]) -> None:
        reqs = self.running
        self._ensure_cache(max(r.cached for r in reqs) + 1)
        view = self.cache.rows(0, len(reqs), lengths=[r.cached for r in reqs])
        tok_N1 = torch.tensor([[r.tokens[-1]] for r in reqs], device=self._device())
        trace = Trace() if any(r.routes is not None for r in reqs) else None
        logits_NV = self.model(tok_N1, cache=view, trace=trace)[:, -1]
        for i, r in enumerate(reqs):
            r.cached += 1
            if r.routes is not None:
                for layer, route in enumerate(trace.routes):
                    if route is not None:
                        r.routes[layer].append(route[i])
        self._sample(list(reqs), logits_NV, events)

    def _prefill(self, events: list[StepEvent]) -> None:
        """Admit waiting requests into the free rows (at least one, then up to max_prefill_tokens padded)."""
        free = self.max_batch - len(self.running)
        new: list[_Request] = []
        for req in self.waiting[:free]:
            longest = max([len(r.prompt) for r in new] + [len(req.prompt)])
            if new and longest * (len(new) + 1) > self.max_prefill_tokens:
                break
            new.append(req)
        del self.waiting[: len(new)]
        lens = [len(r.prompt) for r in new]
        T = max(lens)
        self._ensure_cache(T)
        dev = self._device()
        ids_BT = torch.zeros(len(new), T, dtype=torch.long, device=dev)
        for b, r in enumerate(new):
            ids_BT[b, : lens[b]] = torch.tensor(r.prompt, device=dev)
        n = len(self.running)
        view = self.cache.rows(n, n + len(new))
        trace = Trace() if any(r.routes is not None for r in new) else None
        h_BTd = self.model.hidden(ids_BT, cache=view, trace=trace)
        last_Bd = h_BTd[torch.arange(len(new), device=dev), torch.tensor(lens, device=dev) - 1]
        logits_NV = self.model.head(last_Bd)
        for b, r in enumerate(new):
            r.cached = lens[b]
            if r.routes is not None:
                for layer, route in enumerate(trace.routes):
                    if route is not None:
                        r.routes[layer].append(route[b, : lens[b]])
        self.running.extend(new)
        self.peak_running = max(self.peak_running, len(self.running))
        self._sample(new, logits_NV, events)

    def _sample(self, reqs: list[_Request], logits_NV: torch.Tensor, events: list[StepEvent]) -> None:
        params = [r.params for r in reqs]
        if self.vocab_limit is not None and self.vocab_limit < logits_NV.shape[1]:
            logits_NV[:, self.vocab_limit:] = float("-inf")
        banning = [i for i, p in enumerate(params) if p.banned_token_ids]
        if banning:   # the raw argmax, before the ban: how often the ban changed the model's first choice
            top = logits_NV[banning].argmax(-1).tolist()
            for i, t in zip(banning, top):
                reqs[i].banned_argmax += t in params[i].banned_token_ids
        lp_NV, kept_NV = process_logits(logits_NV, params)
        tok_N = sample(lp_NV, [r.generator for r in reqs], [p.temperature == 0 for p in params])
        lp_N = lp_NV.gather(1, tok_N[:, None]).squeeze(1)
        want_kept = [i for i, r in enumerate(reqs) if r.kept is not None]
        kept_rows = KeptSets.encode(kept_NV[want_kept]) if want_kept else []
        kept_of = dict(zip(want_kept, kept_rows))
        finished: list[tuple[_Request, str, bool, int | str | None]] = []
        for i, (r, tok, lp) in enumerate(zip(reqs, tok_N.tolist(), lp_N.tolist())):
            r.tokens.append(tok)
            r.logprobs.append(lp)
            if r.kept is not None:
                r.kept.append(kept_of[i])
            done = self._finished(r, tok)
            if done is not None:
                finished.append((r, *done))
            else:
                events.append(StepEvent(r.rid, tok))
        for r, reason, truncated, stop_reason in finished:
            self._release(self.running.index(r))
            events.append(StepEvent(r.rid, r.tokens[-1], self._complete(r, reason, truncated, stop_reason)))

    def _finished(self, r: _Request, tok: int):
        """(finish_reason, truncated, stop_reason) once the request is done, else None."""
        p = r.params
        if tok == self.eos_id or tok in p.stop_token_ids:
            return "stop", False, tok
        if p.stop:
            text = self.decode(r.tokens)
            longest = max(len(s) for s in p.stop)
            window = text[max(0, r.text_len - longest + 1):]
            hit = [s for s in p.stop if s in window]
            r.text_len = len(text)
            if hit:
                return "stop", False, min(hit, key=window.index)
        if len(r.tokens) >= p.max_tokens or len(r.prompt) + len(r.tokens) >= self.max_len:
            return "length", True, None
        return None

    def _release(self, row: int) -> None:
        """Free a running row; the last running row moves into it so rows 0..n-1 stay occupied."""
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.copy_row(last, row, moved.cached)
            self.running[row] = moved
        self.running.pop()

    def _complete(self, r: _Request, reason: str, truncated: bool, stop_reason) -> Completion:
        routes = None
        if r.routes is not None:
            routes = [torch.cat(chunks).cpu() if chunks else None for chunks in r.routes]
        return Completion(prompt_ids=r.prompt, token_ids=list(r.tokens),
                          logprobs=list(r.logprobs) if r.params.logprobs else None, kept=r.kept, routes=routes,
                          finish_reason=reason, truncated=truncated, stop_reason=stop_reason, request_id=r.rid,
                          banned_argmax=r.banned_argmax)
