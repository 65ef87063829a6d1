"""Lightning-indexer scores in Triton, and top-k over them in bounded memory.

    I[t,s] = k_scale[s] * sum_h w[t,h] * ReLU(q[t,h] . k[s])        (fp32; -inf outside [ks_t, ke_t))

One program scores a [BLOCK_T queries] x [BLOCK_S keys] tile: the key tile is loaded once, the heads are
a loop of tl.dot([BLOCK_T, D] x [D, BLOCK_S]) with the ReLU and the head weight applied per head (the
ReLU comes before the weighting, so the heads cannot be folded into one GEMM). A tile whose keys are all
outside every query's [ks, ke) writes -inf without any dot.

`indexer_topk` scores queries in chunks of at most CHUNK_ELEMS logits (only the key columns some query
of the chunk can see: [min ks, max ke)), then selects with `reference.select_topk` on each chunk, so the
result equals the reference exactly whenever the scores do (same tie rule: lowest index first).

Legend: B batch, T queries, S keys, H indexer heads, D head dim, K top-k width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._jit import device_guard, dot_precision, kernel, mm, pow2, upcast_dots

CHUNK_ELEMS = 1 << 25  # fp32 logits per chunk (128 MiB); select_topk adds ~8x that in int64 temporaries


@kernel
def _indexer_scores_kernel(
    q_ptr, w_ptr, k_ptr, scale_ptr, ks_ptr, ke_ptr, out_ptr,
    T, S_lo, S_n, D,
    sq_b, sq_t, sq_h, sw_b, sw_t, sw_h, sk_b, sk_s, ssc_b, ssc_s, sr_b, sr_t, so_b, so_t,
    H: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # column of the output (key S_lo + column)
    offs_s = S_lo + offs_c
    offs_d = tl.arange(0, BLOCK_D)
    mt = offs_t < T
    mc = offs_c < S_n
    md = offs_d < D

    ks = tl.load(ks_ptr + b * sr_b + offs_t * sr_t, mask=mt, other=2**62)
    ke = tl.load(ke_ptr + b * sr_b + offs_t * sr_t, mask=mt, other=0)
    s_first = S_lo + pid_s * BLOCK_S
    acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
    if (s_first < tl.max(ke, axis=0)) & (s_first + BLOCK_S > tl.min(ks, axis=0)):
        k = tl.load(k_ptr + b * sk_b + offs_s[None, :] * sk_s + offs_d[:, None],
                    mask=md[:, None] & mc[None, :], other=0.0)  # [BLOCK_D, BLOCK_S]
        q_base = q_ptr + b * sq_b + offs_t[:, None] * sq_t + offs_d[None, :]
        w_base = w_ptr + b * sw_b + offs_t * sw_t
        for h in range(H):
            q = tl.load(q_base + h * sq_h, mask=mt[:, None] & md[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            w = tl.load(w_base + h * sw_h, mask=mt, other=0.0).to(tl.float32)
            logits = mm(q, k, None, DOT_PREC, UPCAST)
            acc += tl.maximum(logits, 0.0) * w[:, None]
    if HAS_SCALE:
        sc = tl.load(scale_ptr + b * ssc_b + offs_s * ssc_s, mask=mc, other=0.0).to(tl.float32)
        acc = acc * sc[None, :]
    valid = (offs_s[None, :] >= ks[:, None]) & (offs_s[None, :] < ke[:, None])
    acc = tl.where(valid, acc, float("-inf"))
    tl.store(out_ptr + b * so_b + offs_t[:, None] * so_t + offs_c[None, :], acc, mask=mt[:, None] & mc[None, :])


def _common_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    if q.dtype == k.dtype and q.dtype not in fp8:
        return q.dtype
    if q.dtype in fp8 and k.dtype in fp8:
        return torch.bfloat16  # e4m3/e5m2 values are exact in bf16 (no native FP8 path yet)
    return torch.float32


def indexer_scores(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, s_lo: int = 0, s_hi: int | None = None,
                   block_t: int = 64, block_s: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """fp32 logits [B, T, s_hi - s_lo] for keys [s_lo, s_hi); -inf outside each query's [ks, ke)."""
    B, T, H, D = q_BTHD.shape
    S = k_BSD.shape[1]
    s_hi = S if s_hi is None else s_hi
    n = max(0, s_hi - s_lo)
    dev = q_BTHD.device
    out = torch.empty(B, T, n, dtype=torch.float32, device=dev)
    if B == 0 or T == 0 or n == 0:
        return out
    dt = _common_dtype(q_BTHD, k_BSD)
    q = q_BTHD.to(dt)
    k = k_BSD.to(dt)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    w = w_BTH
    ks = ks_BT.to(torch.int64).contiguous()
    ke = ke_BT.to(torch.int64).contiguous()
    has_scale = k_scale_BS is not None
    sc = k_scale_BS if has_scale else ks  # any tensor: never read
    grid = (triton.cdiv(T, block_t), triton.cdiv(n, block_s), B)
    with device_guard(dev):
        _indexer_scores_kernel.on(dev)[grid](
            q, w, k, sc, ks, ke, out,
            T, s_lo, n, D,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), w.stride(2),
            k.stride(0), k.stride(1), sc.stride(0), sc.stride(1), ks.stride(0), ks.stride(1),
            out.stride(0), out.stride(1),
            H=H, HAS_SCALE=has_scale, BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=pow2(D),
            DOT_PREC=dot_precision(dt), UPCAST=upcast_dots(dt),
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


def indexer_topk(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, topk: int,
                 chunk_elems: int = CHUNK_ELEMS, **blocks) -> torch.Tensor:
    """Top-k key indices per query: int64 [B, T, min(topk, S)], sorted by score, -1 padded (see reference)."""
    B, T, _, _ = q_BTHD.shape
    S = k_BSD.shape[1]
    K = min(topk, S)
    dev = q_BTHD.device
    out = torch.full((B, T, K), reference.INVALID, dtype=torch.int64, device=dev)
    if B == 0 or T == 0 or K <= 0:
        return out
    ks_BT = ks_BT.to(torch.int64).clamp(0, S)
    ke_BT = ke_BT.to(torch.int64).clamp(0, S)
    chunk = max(1, chunk_elems // (B * S))
    if 64 <= chunk < T:
        chunk = chunk // 64 * 64  # whole query blocks
    # One host sync for every chunk's key range, not one per chunk.
    starts = list(range(0, T, chunk))
    bounds = torch.stack([torch.stack((ks_BT[:, t0:t0 + chunk].min(), ke_BT[:, t0:t0 + chunk].max())) for t0 in starts])
    for t0, (lo, hi) in zip(starts, bounds.tolist()):
        if hi <= lo:
            continue  # no query of the chunk sees any key
        ks_c, ke_c = ks_BT[:, t0:t0 + chunk], ke_BT[:, t0:t0 + chunk]
        scores = indexer_scores(q_BTHD[:, t0:t0 + chunk], w_BTH[:, t0:t0 + chunk], k_BSD, k_scale_BS,
                                ks_c, ke_c, lo, hi, **blocks)
        idx = reference.select_topk(scores, ks_c - lo, ke_c - lo, topk)
        out[:, t0:t0 + chunk, : idx.shape[-1]] = torch.where(idx >= 0, idx + lo, idx)
    return out
