"""Masked MHA mode on CPU (V3.2's short-prefill mode): MHA over a key window, each query softmaxed over its
top-k set only. Inference, bf16, with the C softmax; otherwise the reference's SDPA call.

Per block of queries (`MHA_ROWS`) and group of heads (as many as fit `MHA_BLOCK_BYTES` of logits), three
steps on the block's own key range [lo, hi) (the smallest and largest selected key, so a prompt's later keys
are never scored):

    s = q k^T            one bf16 batched matmul per head group, into a reused buffer     [h, t, w]
    p = softmax_sel(s)   in C, in place: only each query's selected logits are exponentiated
                         (compressed to the front, softmaxed, expanded back; zeros elsewhere)
    o = p v              one bf16 batched matmul, v at its true width (SDPA needs it padded)

Against SDPA with a boolean mask (its flash kernel scores, exponentiates and masks every pair) this runs
~2-3x faster at the `small` preset's shapes on 2 cores: the batched matmuls run at several hundred GFLOP/s,
and of a window's w keys per row only the k selected ones reach the exponential. The logits are rounded to
bf16 as in the absorbed path (`mla.py`); the softmax is fp32.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from . import native

MHA_ROWS = 512  # queries per block: the matmuls' key reads amortise over this many rows
MHA_BLOCK_BYTES = 16 << 20  # bf16 logits of one head group (stays in a 32 MB L3)


def masked_mha_native(dtype: torch.dtype) -> bool:
    """Whether `masked_mha` runs the C path for this dtype (the cost model in `model.attention` depends on it)."""
    return native.bf16_lib(dtype) is not None


def masked_mha(q_BTHD, k_BHWD, v_BHWD, idx_BTK, scale: float, v_dim: int) -> torch.Tensor:
    """`reference.masked_mha`: idx indexes the window's keys (-1 padded); output [B, T, H, v_dim]."""
    dts = {q_BTHD.dtype, k_BHWD.dtype, v_BHWD.dtype}
    lib = native.bf16_lib(q_BTHD.dtype) if len(dts) == 1 else None
    if lib is None or (torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHD, k_BHWD, v_BHWD))):
        return ref.masked_mha(q_BTHD, k_BHWD, v_BHWD, idx_BTK, scale, v_dim)
    B, T, H, _ = q_BTHD.shape
    W, K = k_BHWD.shape[2], idx_BTK.shape[-1]
    rows = max(1, min(T, MHA_ROWS))
    group = max(1, min(H, MHA_BLOCK_BYTES // (2 * rows * max(1, W))))
    buf = q_BTHD.new_empty(group * rows * W)
    o_BTHV = q_BTHD.new_empty(B, T, H, v_dim)
    v_BHWV = v_BHWD[..., :v_dim]
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            idx_tK = idx_BTK[b, t0:t1].contiguous()  # named: C reads it through a raw pointer
            hi = int(idx_tK.max()) + 1 if K else 0
            if hi <= 0:  # no query of the block selected anything
                o_BTHV[b, t0:t1] = 0
                continue
            lo = int(idx_tK.masked_fill(idx_tK < 0, hi).min())
            q_HtD = q_BTHD[b, t0:t1].transpose(0, 1)
            for h0 in range(0, H, group):
                h1 = min(H, h0 + group)
                s_htw = buf[: (h1 - h0) * (t1 - t0) * (hi - lo)].view(h1 - h0, t1 - t0, hi - lo)
                torch.bmm(q_HtD[h0:h1], k_BHWD[b, h0:h1, lo:hi].transpose(1, 2), out=s_htw)
                lib.dsv32_masked_softmax_bf16(s_htw.data_ptr(), idx_tK.data_ptr(), lo, t1 - t0, h1 - h0, K, hi - lo,
                                              scale, native.threads())
                o_BTHV[b, t0:t1, h0:h1] = torch.bmm(s_htw, v_BHWV[b, h0:h1, lo:hi]).transpose(0, 1)
    return o_BTHV
