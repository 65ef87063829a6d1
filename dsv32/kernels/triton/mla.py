"""Sparse MLA (absorbed/MQA mode over the latent cache) in Triton: forward and backward.

Forward (TileLang `sparse_mla_fwd`, FlashMLA sparse prefill; dsa-anchors.md §3.1-3.2): one program per
(batch, query, block of heads) runs a dense MLA decode loop whose KV loads are gathered by the query's
top-k indices, BLOCK_K at a time:

    s = (q_lat[H, R] @ kv[idx]^T + q_pe[H, P] @ pe[idx]^T) * scale      -1 (or >= S) slots masked out
    online softmax in fp32 (base 2), o[H, R] += p @ kv[idx]              (the value is the latent itself)

and stores o (input dtype) and lse = log sum_k exp(s) (fp32, natural log; -inf for a row with no valid
slot, whose o is 0).

Backward (TileLang `sparse_mla_bwd`): delta = rowsum(o * do); per (batch, query, head block) recompute
p = exp(s - lse) on the gathered set, dp = do @ kv^T, ds = p * (dp - delta), then

    dq_lat = scale * ds @ kv,  dq_pe = scale * ds @ pe                    (written once per query)
    dkv[idx] += p^T @ do + scale * ds^T @ q_lat,  dpe[idx] += scale * ds^T @ q_pe   (fp32 atomic scatter-add)

Legend: B batch, T queries, S keys, H heads, R kv latent rank, P rope dims, K selected keys per query.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._jit import device_guard, dot_precision, kernel, mm, pow2, upcast_dots

LOG2E = math.log2(math.e)


@kernel
def _sparse_mla_fwd_kernel(
    q_ptr, qp_ptr, kv_ptr, pe_ptr, idx_ptr, o_ptr, lse_ptr,
    T, S, H, R, P, qk_scale,
    sq_b, sq_t, sq_h, sqp_b, sqp_t, sqp_h, skv_b, skv_s, spe_b, spe_s, si_b, si_t, so_b, so_t, so_h,
    K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    mh = offs_h < H
    mr = offs_r < R
    mp = offs_p < P

    q = tl.load(q_ptr + b * sq_b + t * sq_t + offs_h[:, None] * sq_h + offs_r[None, :],
                mask=mh[:, None] & mr[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    qp = tl.load(qp_ptr + b * sqp_b + t * sqp_t + offs_h[:, None] * sqp_h + offs_p[None, :],
                 mask=mh[:, None] & mp[None, :], other=0.0)  # [BLOCK_H, BLOCK_P]
    idx_base = idx_ptr + b * si_b + t * si_t
    kv_base = kv_ptr + b * skv_b
    pe_base = pe_ptr + b * spe_b

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < S)
        row = tl.where(valid, idx, 0)  # never -1: masked rows read nothing
        kv = tl.load(kv_base + row[:, None] * skv_s + offs_r[None, :],
                     mask=valid[:, None] & mr[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
        pe = tl.load(pe_base + row[:, None] * spe_s + offs_p[None, :],
                     mask=valid[:, None] & mp[None, :], other=0.0)  # [BLOCK_K, BLOCK_P]
        s = mm(q, tl.trans(kv), None, DOT_PREC, UPCAST)
        s = mm(qp, tl.trans(pe), s, DOT_PREC, UPCAST)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = mm(p.to(kv.dtype), kv, acc, DOT_PREC, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(o_ptr + b * so_b + t * so_t + offs_h[:, None] * so_h + offs_r[None, :],
             o.to(o_ptr.dtype.element_ty), mask=mh[:, None] & mr[None, :])
    tl.store(lse_ptr + (b * T + t) * H + offs_h, lse, mask=mh)


@kernel
def _sparse_mla_bwd_kernel(
    q_ptr, qp_ptr, kv_ptr, pe_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr, dqp_ptr, dkv_ptr, dpe_ptr,
    T, S, H, R, P, scale,
    sq_b, sq_t, sq_h, sqp_b, sqp_t, sqp_h, skv_b, skv_s, spe_b, spe_s, si_b, si_t, sdo_b, sdo_t, sdo_h,
    K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # dq/dqp are contiguous like q/qp ([B, T, H, R] / [B, T, H, P]); dkv/dpe are contiguous fp32 [B, S, R/P].
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    mh = offs_h < H
    mr = offs_r < R
    mp = offs_p < P
    mhr = mh[:, None] & mr[None, :]
    mhp = mh[:, None] & mp[None, :]

    q = tl.load(q_ptr + b * sq_b + t * sq_t + offs_h[:, None] * sq_h + offs_r[None, :], mask=mhr, other=0.0)
    qp = tl.load(qp_ptr + b * sqp_b + t * sqp_t + offs_h[:, None] * sqp_h + offs_p[None, :], mask=mhp, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + t * sdo_t + offs_h[:, None] * sdo_h + offs_r[None, :], mask=mhr, other=0.0)
    row_bth = (b * T + t) * H + offs_h
    lse = tl.load(lse_ptr + row_bth, mask=mh, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty row: every p below is masked to 0 anyway
    delta = tl.load(delta_ptr + row_bth, mask=mh, other=0.0)
    idx_base = idx_ptr + b * si_b + t * si_t
    kv_base = kv_ptr + b * skv_b
    pe_base = pe_ptr + b * spe_b
    dkv_base = dkv_ptr + b * S * R
    dpe_base = dpe_ptr + b * S * P

    dq = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    dqp = tl.zeros([BLOCK_H, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < S)
        row = tl.where(valid, idx, 0)
        mkr = valid[:, None] & mr[None, :]
        mkp = valid[:, None] & mp[None, :]
        kv = tl.load(kv_base + row[:, None] * skv_s + offs_r[None, :], mask=mkr, other=0.0)
        pe = tl.load(pe_base + row[:, None] * spe_s + offs_p[None, :], mask=mkp, other=0.0)
        s = mm(q, tl.trans(kv), None, DOT_PREC, UPCAST)
        s = mm(qp, tl.trans(pe), s, DOT_PREC, UPCAST)
        p = tl.exp(s * scale - lse[:, None])
        p = tl.where(mh[:, None] & valid[None, :], p, 0.0)  # [BLOCK_H, BLOCK_K] fp32
        dp = mm(do, tl.trans(kv), None, DOT_PREC, UPCAST)
        ds = (p * (dp - delta[:, None]) * scale).to(kv.dtype)  # dL/d(q.k), the softmax scale folded in
        dq = mm(ds, kv, dq, DOT_PREC, UPCAST)
        dqp = mm(ds, pe, dqp, DOT_PREC, UPCAST)
        dkv = mm(tl.trans(p.to(do.dtype)), do, None, DOT_PREC, UPCAST)
        dkv = mm(tl.trans(ds), q, dkv, DOT_PREC, UPCAST)  # [BLOCK_K, BLOCK_R]
        dpe = mm(tl.trans(ds), qp, None, DOT_PREC, UPCAST)  # [BLOCK_K, BLOCK_P]
        tl.atomic_add(dkv_base + row[:, None] * R + offs_r[None, :], dkv, mask=mkr, sem="relaxed")
        tl.atomic_add(dpe_base + row[:, None] * P + offs_p[None, :], dpe, mask=mkp, sem="relaxed")

    tl.store(dq_ptr + row_bth[:, None] * R + offs_r[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mhr)
    tl.store(dqp_ptr + row_bth[:, None] * P + offs_p[None, :], dqp.to(dqp_ptr.dtype.element_ty), mask=mhp)


def _launch_config(H: int, R: int, cfg: dict, backward: bool) -> dict:
    """Block sizes, warps and stages: explicit settings in `cfg` win. Defaults from an H200 sweep
    (`bench.py --sweep`, triton 3.6, bf16, T=S=4096, K=2048): fwd 64 heads x 64 keys, 8 warps at H=128,
    R=512 (186 TFLOP/s) and 16 x 64, 4 warps at H=16, R=256 (78); bwd 32 x 32, 8 warps at H=128, R=512 (80)
    and 16 x 16, 4 warps at H=16, R=256 (69; 32-key blocks with 8 warps spill there: 40x slower)."""
    big = R >= 512 and H >= 32
    if backward:
        bh, bk, nw = (32, 32, 8) if big else (16, 16, 4)
    else:
        bh, bk, nw = (64, 64, 8) if big else (16, 64, 4)
    out = {"block_h": min(bh, pow2(H)), "block_k": bk, "num_warps": nw, "num_stages": 2}
    out.update({k: v for k, v in cfg.items() if v is not None})
    return out


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(kern, dev, B, T, H, args, consts, c):
    """Launch over (B*T, head blocks); a config that does not fit in shared memory (say fp32 inputs at
    R=512) is retried with half the keys, then half the heads, per block."""
    from triton.runtime.errors import OutOfResources

    while True:
        try:
            with device_guard(dev):
                kern.on(dev)[(B * T, triton.cdiv(H, c["block_h"]))](
                    *args, **consts, BLOCK_H=c["block_h"], BLOCK_K=c["block_k"],
                    num_warps=c["num_warps"], num_stages=c["num_stages"])
            return
        except OutOfResources:
            if c["block_k"] > 16:
                c = dict(c, block_k=c["block_k"] // 2)
            elif c["block_h"] > 16:
                c = dict(c, block_h=c["block_h"] // 2)
            else:
                raise


def sparse_mla_fwd(q_lat, q_pe, kv, pe, idx, scale: float, **cfg):
    """(o [B, T, H, R] in q_lat's dtype, lse [B, T, H] fp32). Inputs share one dtype.
    `cfg`: block_h, block_k, num_warps, num_stages (defaults: `_launch_config`)."""
    B, T, H, R = q_lat.shape
    P = q_pe.shape[-1]
    S = kv.shape[1]
    K = idx.shape[-1]
    o = torch.empty(B, T, H, R, dtype=q_lat.dtype, device=q_lat.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q_lat.device)
    if B * T * H == 0:
        return o, lse
    if K == 0 or S == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    args = (q_lat, q_pe, kv, pe, idx, o, lse,
            T, S, H, R, P, scale * LOG2E,
            q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
            kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1), idx.stride(0), idx.stride(1),
            o.stride(0), o.stride(1), o.stride(2))
    consts = {"K": K, "BLOCK_R": pow2(R), "BLOCK_P": pow2(P), "DOT_PREC": dot_precision(kv.dtype),
                  "UPCAST": upcast_dots(kv.dtype)}
    _launch(_sparse_mla_fwd_kernel, q_lat.device, B, T, H, args, consts, _launch_config(H, R, cfg, backward=False))
    return o, lse


def sparse_mla_bwd(q_lat, q_pe, kv, pe, idx, o, lse, do, scale: float, **cfg):
    """Gradients (dq_lat, dq_pe, dkv, dpe) in the inputs' dtypes. `cfg` as for `sparse_mla_fwd`."""
    B, T, H, R = q_lat.shape
    P = q_pe.shape[-1]
    S = kv.shape[1]
    K = idx.shape[-1]
    dev = q_lat.device
    dq = torch.zeros(B, T, H, R, dtype=q_lat.dtype, device=dev)
    dqp = torch.zeros(B, T, H, P, dtype=q_pe.dtype, device=dev)
    dkv = torch.zeros(B, S, R, dtype=torch.float32, device=dev)
    dpe = torch.zeros(B, S, P, dtype=torch.float32, device=dev)
    if B * T * H > 0 and K > 0 and S > 0:
        do = _last_dim_contiguous(do)
        delta = (o.float() * do.float()).sum(-1).contiguous()  # [B, T, H]
        args = (q_lat, q_pe, kv, pe, idx, do, lse, delta,
                dq, dqp, dkv, dpe,
                T, S, H, R, P, scale,
                q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
                kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1), idx.stride(0), idx.stride(1),
                do.stride(0), do.stride(1), do.stride(2))
        consts = {"K": K, "BLOCK_R": pow2(R), "BLOCK_P": pow2(P), "DOT_PREC": dot_precision(kv.dtype),
                      "UPCAST": upcast_dots(kv.dtype)}
        _launch(_sparse_mla_bwd_kernel, dev, B, T, H, args, consts, _launch_config(H, R, cfg, backward=True))
    return dq, dqp, dkv.to(kv.dtype), dpe.to(pe.dtype)


class SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_lat, q_pe, kv, pe, idx, scale, blocks):
        o, lse = sparse_mla_fwd(q_lat, q_pe, kv, pe, idx, scale, **blocks.get("fwd", {}))
        ctx.save_for_backward(q_lat, q_pe, kv, pe, idx, o, lse)
        ctx.scale, ctx.blocks = scale, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q_lat, q_pe, kv, pe, idx, o, lse = ctx.saved_tensors
        dq, dqp, dkv, dpe = sparse_mla_bwd(q_lat, q_pe, kv, pe, idx, o, lse, do, ctx.scale, **ctx.blocks.get("bwd", {}))
        return dq, dqp, dkv, dpe, None, None, None


def sparse_mla(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale: float, blocks: dict | None = None):
    """Sparse MLA over the gathered latents (same result as reference.sparse_mla_gathered), differentiable
    w.r.t. q_lat, q_pe, kv and pe. -1 slots (and indices >= S) select nothing; rows with no valid slot give 0.

    `blocks`: optional launch settings {"fwd": {...}, "bwd": {...}} (block_h, block_k, num_warps, num_stages).
    """
    dt = q_lat_BTHR.dtype
    if not (q_pe_BTHP.dtype == kv_BSR.dtype == pe_BSP.dtype == dt):
        dt = torch.promote_types(torch.promote_types(dt, q_pe_BTHP.dtype),
                                 torch.promote_types(kv_BSR.dtype, pe_BSP.dtype))
    args = [_last_dim_contiguous(x.to(dt)) for x in (q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP)]
    idx = idx_BTK if idx_BTK.stride(-1) == 1 else idx_BTK.contiguous()
    o = SparseMLA.apply(*args, idx, float(scale), blocks or {})
    return o.to(q_lat_BTHR.dtype)
