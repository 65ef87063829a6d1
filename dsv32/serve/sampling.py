"""The one sampling transform of dsv32: banned ids out, temperature -> top-k -> top-p -> min-p, then a draw.

The sampler and the trainer must agree on the distribution a token was drawn from, or the first RL
step's importance ratio is not 1 (rl-distill-anchors.md §1.5 Keep Sampling Mask, §6.5 item 6). So
`process_logits` (sampling time) and `logprobs_over_kept` (training time, differentiable) share the same
two steps, `_scaled` and `_masked_log_softmax`: given the same logits, the same kept set and the same
temperature they return bit-identical log-probs.

    lp_NV, kept_NV = process_logits(logits_NV, SamplingParams(temperature=0.7, top_p=0.9))
    tok_N = sample(lp_NV, generators=[None] * N)
    kept = KeptSets.from_masks(kept_NV)                 # compact: sorted ids or packed bits per token
    lp_train_N = logprobs_over_kept(logits_NV, tok_N, kept.mask(), temperature=0.7)   # == lp_NV[tok]

Legend: N rows (tokens being sampled), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy (the kept set is the argmax alone; its log-prob is 0)
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    min_p: float = 0.0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # the engine's EOS is always a stop
    stop: tuple[str, ...] = ()  # stop strings (the engine needs a decode function for them)
    seed: int | None = None  # per-request torch.Generator: the same seed gives the same tokens
    logprobs: bool = False  # per generated token: log-prob under the processed (kept, renormalised) dist
    return_kept: bool = False  # per generated token: the kept-token set (Keep Sampling Mask), compact
    return_routes: bool = False  # MoE routes of every token the model ran on (Keep Routing)
    banned_token_ids: tuple[int, ...] = ()  # never sampled: no mass, outside the kept set (see `banning`)

    def __post_init__(self):
        self.stop_token_ids, self.stop = tuple(self.stop_token_ids), tuple(self.stop)
        self.banned_token_ids = tuple(self.banned_token_ids)
        checks = [("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
                  ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
                  ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
                  ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
                  ("banned_token_ids", all(isinstance(t, int) and t >= 0 for t in self.banned_token_ids),
                   "must be token ids (ints >= 0)")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {rule}")
        self.banned_token_ids = tuple(sorted(set(self.banned_token_ids)))

    @property
    def truncates(self) -> bool:
        """True when some tokens can be cut from the distribution (the kept set is not the vocabulary)."""
        return (self.temperature == 0 or self.top_k > 0 or self.top_p < 1 or self.min_p > 0
                or bool(self.banned_token_ids))

    def banning(self, token_ids) -> "SamplingParams":
        """A copy that never samples `token_ids` (e.g. a non-thinking turn's reasoning markers). A caller that
        asked for log-probs also gets the kept sets, since they no longer span the vocabulary: RL replays them
        (Keep Sampling Mask) and its importance ratio stays exactly 1 on-policy."""
        return replace(self, banned_token_ids=(*self.banned_token_ids, *token_ids),
                       return_kept=self.return_kept or self.logprobs)


def _per_row(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    rows = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} SamplingParams for {n} rows of logits; give one, or one per row")
    return rows


def _scaled(logits_NV: torch.Tensor, temperature_N: torch.Tensor) -> torch.Tensor:
    """logits / temperature in fp32 (fp64 stays fp64); greedy rows (temperature 0) are left unscaled."""
    dtype = torch.promote_types(logits_NV.dtype, torch.float32)
    t_N1 = torch.where(temperature_N > 0, temperature_N, 1.0).to(dtype)[:, None]
    return logits_NV.to(dtype) / t_N1


def _masked_log_softmax(x_NV: torch.Tensor, kept_NV: torch.Tensor | None) -> torch.Tensor:
    return torch.log_softmax(x_NV if kept_NV is None else x_NV.masked_fill(~kept_NV, float("-inf")), dim=-1)


def _temperatures(temperature, n: int, device) -> torch.Tensor:
    return torch.as_tensor(temperature, dtype=torch.float64, device=device).reshape(-1).expand(n)


@torch.no_grad()
def process_logits(logits_NV: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]):
    """(banned ids out) temperature -> top-k -> top-p -> min-p. Returns (log-softmax over the kept set, -inf
    elsewhere
    [N, V] fp32 (fp64 for fp64 logits); kept mask [N, V] bool). `params`: one for all rows or one per row.

    top-k keeps the k highest (ties to the lower id); top-p the smallest prefix of the sorted distribution
    whose mass reaches p (always >= 1 token); min-p the tokens with p >= min_p * p_max. Each filter sees the
    distribution renormalised over what the previous one kept (min-p is invariant to that).
    """
    N, V = logits_NV.shape
    rows = _per_row(params, N)
    dev = logits_NV.device
    temp_N = torch.tensor([p.temperature for p in rows], dtype=torch.float64, device=dev)
    x_NV = _scaled(logits_NV, temp_N)
    kept_NV = torch.ones(N, V, dtype=torch.bool, device=dev)
    banned_NV = None
    if any(p.banned_token_ids for p in rows):   # banned first: the filters and the argmax never see them
        banned_NV = torch.zeros(N, V, dtype=torch.bool, device=dev)
        for ids in {p.banned_token_ids for p in rows if p.banned_token_ids}:   # one write per distinct ban
            sel_N1 = torch.tensor([i for i, p in enumerate(rows) if p.banned_token_ids == ids], device=dev)[:, None]
            banned_NV[sel_N1, torch.tensor([t for t in ids if t < V], dtype=torch.long, device=dev)] = True
        x_NV, kept_NV = x_NV.masked_fill(banned_NV, float("-inf")), ~banned_NV
    if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in rows):
        top_k_N1 = torch.tensor([p.top_k if p.top_k > 0 else V for p in rows], device=dev)[:, None]
        top_p_N1 = torch.tensor([p.top_p for p in rows], dtype=x_NV.dtype, device=dev)[:, None]
        min_p_N1 = torch.tensor([p.min_p for p in rows], dtype=x_NV.dtype, device=dev)[:, None]
        xs_NV, order_NV = x_NV.sort(dim=-1, descending=True, stable=True)
        rank_1V = torch.arange(V, device=dev)[None]
        keep_NV = rank_1V < top_k_N1
        probs_NV = torch.softmax(xs_NV.masked_fill(~keep_NV, float("-inf")), dim=-1)
        mass_before_NV = probs_NV.cumsum(-1) - probs_NV
        keep_NV &= (mass_before_NV < top_p_N1) | (top_p_N1 >= 1)
        probs_NV = torch.softmax(xs_NV.masked_fill(~keep_NV, float("-inf")), dim=-1)
        keep_NV &= probs_NV >= min_p_N1 * probs_NV[:, :1]
        kept_NV = torch.zeros_like(keep_NV).scatter_(1, order_NV, keep_NV)
        if banned_NV is not None:
            kept_NV &= ~banned_NV
    greedy_N = temp_N == 0
    if bool(greedy_N.any()):
        argmax_NV = torch.zeros_like(kept_NV).scatter_(1, x_NV.argmax(-1, keepdim=True), True)
        kept_NV = torch.where(greedy_N[:, None], argmax_NV, kept_NV)
    return _masked_log_softmax(x_NV, kept_NV), kept_NV


def logprobs_over_kept(logits_NV: torch.Tensor, token_ids_N: torch.Tensor, kept_NV: torch.Tensor | None,
                       temperature: float | torch.Tensor) -> torch.Tensor:
    """Differentiable log-probs [N] of `token_ids_N` under softmax(logits / temperature) renormalised over
    the replayed kept sets (None: the whole vocabulary). The trainer's side of Keep Sampling Mask: same
    math as `process_logits`, so on-policy the ratio against the sampler's log-probs is exactly 1."""
    N = logits_NV.shape[0]
    x_NV = _scaled(logits_NV, _temperatures(temperature, N, logits_NV.device))
    if kept_NV is not None:
        kept_NV = kept_NV.to(device=logits_NV.device, dtype=torch.bool)
    lp_NV = _masked_log_softmax(x_NV, kept_NV)
    return lp_NV.gather(1, token_ids_N.to(logits_NV.device).long()[:, None]).squeeze(1)


@torch.no_grad()
def sample(logprobs_NV: torch.Tensor, generators: Sequence[torch.Generator | None],
           greedy: Sequence[bool] | None = None) -> torch.Tensor:
    """Draw one token per row from exp(logprobs). Rows with a generator draw with it (reproducible per
    request, whatever else is in the batch); the others share the global RNG. Greedy rows take the argmax."""
    N = logprobs_NV.shape[0]
    out_N = logprobs_NV.argmax(-1)
    probs_NV = logprobs_NV.exp()
    greedy = [False] * N if greedy is None else list(greedy)
    shared = [i for i in range(N) if generators[i] is None and not greedy[i]]
    if shared:
        idx = torch.tensor(shared, device=logprobs_NV.device)
        out_N[idx] = torch.multinomial(probs_NV[idx], 1).squeeze(1)
    for i in range(N):
        if generators[i] is not None and not greedy[i]:
            out_N[i] = torch.multinomial(probs_NV[i], 1, generator=generators[i])[0]
    return out_N


class KeptSets:
    """The kept-token sets of a sequence of sampled tokens (Keep Sampling Mask), stored compactly.

    Per token, whichever is smaller: the sorted kept ids (int32; top-p on a peaked distribution keeps a
    handful) or the packed bit mask (V / 8 bytes). `mask()` expands them back to bool [n_tokens, V].
    """

    def __init__(self, vocab_size: int, rows: list[torch.Tensor] | None = None):
        self.vocab_size = vocab_size
        self.rows: list[torch.Tensor] = rows or []  # int32 ids or uint8 packed bits, on the CPU

    @staticmethod
    def encode(kept_NV: torch.Tensor) -> list[torch.Tensor]:
        """One compact CPU entry per row of a bool mask."""
        N, V = kept_NV.shape
        n_bytes = (V + 7) // 8
        counts = kept_NV.sum(-1).tolist()
        bits_NB = _pack_bits(kept_NV).cpu() if any(4 * c >= n_bytes for c in counts) else None
        out = []
        for i, c in enumerate(counts):
            if 4 * c < n_bytes:
                out.append(kept_NV[i].nonzero().squeeze(1).to(torch.int32).cpu())
            else:
                out.append(bits_NB[i].clone())
        return out

    @classmethod
    def from_masks(cls, kept_NV: torch.Tensor) -> "KeptSets":
        return cls(kept_NV.shape[1], cls.encode(kept_NV))

    def append(self, entry: torch.Tensor) -> None:
        self.rows.append(entry)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows)

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """bool [n_tokens, V]."""
        V = self.vocab_size
        out = torch.zeros(len(self.rows), V, dtype=torch.bool)
        for i, r in enumerate(self.rows):
            if r.dtype == torch.int32:
                out[i, r.long()] = True
            else:
                out[i] = _unpack_bits(r[None], V)[0]
        return out.to(device)


def _pack_bits(mask_NV: torch.Tensor) -> torch.Tensor:
    N, V = mask_NV.shape
    padded = torch.nn.functional.pad(mask_NV.to(torch.uint8), (0, (-V) % 8))
    weights = (1 << torch.arange(8, device=mask_NV.device)).to(torch.uint8)
    return (padded.view(N, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(bits_NB: torch.Tensor, V: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bits_NB.device, dtype=torch.uint8)
    return ((bits_NB[..., None] >> shifts) & 1).bool().flatten(1)[:, :V]
