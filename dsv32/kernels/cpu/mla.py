"""Sparse MLA over gathered latents as an autograd Function: forward saves the log-sum-exp, backward recomputes."""

from __future__ import annotations


import torch

from . import native
from .common import BLOCK_BYTES, _compute_dtype, _rows_for

# The backward's blocks: its working set per query is ~3x the forward's (scores and dp, the gradient rows);
# measured on CPU, both run best at ~20 queries per block, where the batched matmuls amortise the per-block
# ops without leaving the cache.
BACKWARD_BLOCK_BYTES = 3 * BLOCK_BYTES

def _sparse_rows(H: int, K: int, R: int, P: int, esz: int, backward: bool) -> int:
    """Bytes per query of a sparse-attention block."""
    gathered = K * (R + P) * esz
    scores = H * K * 4 * (5 if backward else 3)
    grads = K * (R + P) * (4 + esz) if backward else 0
    return gathered + scores + grads


def _trim(idx_TK: torch.Tensor) -> torch.Tensor:
    """Drop the trailing slots that are -1 in every row of the block (prefill rows with fewer than k keys)."""
    col = (idx_TK >= 0).any(0)
    if idx_TK.shape[1] == 0 or bool(col[-1]):
        return idx_TK
    nz = col.nonzero()
    return idx_TK[:, : max(1, int(nz[-1]) + 1 if nz.numel() else 1)]


def _flat_rows(x_BSC: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, S, C] as one [N, C] matrix of rows and the row offset of each batch row (row b*stride + s).

    A cache slice `buffer[:, :S]` has contiguous rows but gaps between batch rows: it is viewed in place
    (the gap rows are never indexed), so decode never copies the cache; anything else is made contiguous.
    """
    B, S, C = x_BSC.shape
    rows_contiguous = x_BSC.stride(2) == 1 and x_BSC.stride(1) == C
    if rows_contiguous and (B == 1 or (x_BSC.stride(0) % C == 0 and x_BSC.stride(0) >= S * C)):
        per = x_BSC.stride(0) // C if B > 1 else S
        return x_BSC.as_strided(((B - 1) * per + S, C), (C, 1)), per
    return x_BSC.contiguous().view(B * S, C), S


def _row_offsets(r0: int, r1: int, T: int, per: int, device) -> torch.Tensor | None:
    """Flat-row offset of each query row r in [r0, r1) (batch row r // T); None when all are in batch row 0."""
    if r1 <= T:
        return None
    return torch.arange(r0, r1, device=device).div_(T, rounding_mode="floor").mul_(per)[:, None]


class _Gather:
    """Reusable gather buffers: `index_select(..., out=)` into a preallocated buffer is several times faster
    on CPU than the allocating variant (and than advanced indexing)."""

    def __init__(self, kv_NR, pe_NP, rows_max):
        self.kv = torch.empty(rows_max, kv_NR.shape[-1], dtype=kv_NR.dtype, device=kv_NR.device)
        self.pe = torch.empty(rows_max, pe_NP.shape[-1], dtype=pe_NP.dtype, device=pe_NP.device)

    def __call__(self, kv_NR, pe_NP, idx_TK, cdt, off_kv=None, off_pe=None):
        """Gathered latents [T, K, R], [T, K, P] (cdt, contiguous) and the validity mask of the slots.
        `off_*` [T, 1]: each query's batch-row offset into the flat rows (None: 0)."""
        T, K = idx_TK.shape
        valid_TK = idx_TK >= 0
        rows = idx_TK.clamp_min(0)  # -1 reads its batch row's row 0 and is masked: never the last key
        rows_kv = (rows if off_kv is None else rows + off_kv).reshape(-1)
        rows_pe = (rows if off_pe is None else rows + off_pe).reshape(-1)
        kv = torch.index_select(kv_NR, 0, rows_kv, out=self.kv[: T * K])
        pe = torch.index_select(pe_NP, 0, rows_pe, out=self.pe[: T * K])
        return kv.view(T, K, kv.shape[-1]).to(cdt), pe.view(T, K, pe.shape[-1]).to(cdt), valid_TK


def _scaled(q: torch.Tensor, scale: float, cdt: torch.dtype) -> torch.Tensor:
    """The query times the softmax scale, in the compute dtype (forward, backward and target use this)."""
    return q.to(cdt) * scale


def _scores(q_lat_THR, q_pe_THP, kv_TKR, pe_TKP, scale, cdt):
    """Scaled fp32 logits [T, H, K] (the scale is folded into the queries)."""
    s = torch.baddbmm(torch.bmm(_scaled(q_pe_THP, scale, cdt), pe_TKP.transpose(1, 2)),
                      _scaled(q_lat_THR, scale, cdt), kv_TKR.transpose(1, 2))
    return s.float()


def _mask_invalid_(s_THK: torch.Tensor, valid_TK: torch.Tensor) -> torch.Tensor:
    if not bool(valid_TK.all()):
        s_THK.masked_fill_(~valid_TK[:, None, :], float("-inf"))
    return s_THK


def _softmax_lse(s_THK: torch.Tensor, valid_TK: torch.Tensor):
    """Softmax over the valid slots and its log-sum-exp; rows with no valid slot: p = 0, lse = -inf (no NaN)."""
    if s_THK.shape[-1] == 0:
        return s_THK, torch.full(s_THK.shape[:-1], float("-inf"), device=s_THK.device)
    s_THK = _mask_invalid_(s_THK, valid_TK)
    m_TH = s_THK.amax(-1)
    p_THK = torch.softmax(s_THK, dim=-1)
    lse_TH = m_TH - torch.log(p_THK.amax(-1))  # max p = exp(m - lse)
    dead_TH = m_TH == float("-inf")
    if bool(dead_TH.any()):
        p_THK.masked_fill_(dead_TH[..., None], 0.0)
        lse_TH.masked_fill_(dead_TH, float("-inf"))
    return p_THK, lse_TH


def _safe_lse(lse):
    """LSE with -inf (no valid key) replaced by +inf, so exp(s - lse) is 0 there, never NaN."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _sparse_fwd_block(gather, q_lat_THR, q_pe_THP, kv_NR, pe_NP, idx_TK, scale, cdt, off_kv=None, off_pe=None):
    kv_TKR, pe_TKP, valid_TK = gather(kv_NR, pe_NP, idx_TK, cdt, off_kv, off_pe)
    p_THK, lse_TH = _softmax_lse(_scores(q_lat_THR, q_pe_THP, kv_TKR, pe_TKP, scale, cdt), valid_TK)
    return p_THK, lse_TH, kv_TKR


def _joint_forward(q_lat_NHR, q_pe_NHP, kv_BSR, pe_BSP, idx_NK, scale, cdt, tb, T, o_NHR, lse_NH) -> None:
    """The forward blocks on one [kv | pe] copy of the latents (prefill: N * K >= B * S, so the copy costs less
    than a block's gathers): per block one gather of [K, R + P] rows per query, one score matmul
    [q_lat | q_pe] g^T, and p g over all R + P columns, the last P dropped. Against separate kv and pe gathers
    and matmuls this saves a gather, the small P-wide score matmul and a pass over the scores (~10% at 32K);
    the extra P columns of p g cost ~12% of that matmul but keep its operand contiguous."""
    B, S, R = kv_BSR.shape
    N, H, _ = q_lat_NHR.shape
    K = idx_NK.shape[1]
    src_NC = torch.cat((kv_BSR.to(cdt), pe_BSP.to(cdt)), dim=-1).view(B * S, -1)
    g_buf = torch.empty(min(N, tb) * K, src_NC.shape[1], dtype=cdt, device=src_NC.device)
    x_buf = torch.empty(min(N, tb), H, src_NC.shape[1], dtype=cdt, device=src_NC.device)
    lib = native.bf16_lib(cdt)
    for r0 in range(0, N, tb):
        r1 = min(N, r0 + tb)
        idx_TK = _trim(idx_NK[r0:r1])
        off = _row_offsets(r0, r1, T, S, src_NC.device)
        rows_TK = idx_TK.clamp_min(0) if off is None else idx_TK.clamp_min(0) + off  # -1: masked below
        g_TKC = torch.index_select(src_NC, 0, rows_TK.reshape(-1), out=g_buf[: rows_TK.numel()])
        g_TKC = g_TKC.view(r1 - r0, idx_TK.shape[1], -1)
        x_THC = x_buf[: r1 - r0]
        x_THC[..., :R] = _scaled(q_lat_NHR[r0:r1], scale, cdt)
        x_THC[..., R:] = _scaled(q_pe_NHP[r0:r1], scale, cdt)
        s_THK = torch.bmm(x_THC, g_TKC.transpose(1, 2))
        if lib is not None:  # masking, max, exp, sum and cast in one C pass
            lse_TH, valid_TK = lse_NH[r0:r1], idx_TK >= 0  # named: C reads them through raw pointers
            lib.dsv32_softmax_fwd_bf16(s_THK.data_ptr(), lse_TH.data_ptr(), valid_TK.data_ptr(), r1 - r0, H,
                                       s_THK.shape[-1], 1)
            p_THK = s_THK
        else:
            p_THK, lse_NH[r0:r1] = _softmax_lse(s_THK.float(), idx_TK >= 0)
        o_NHR[r0:r1] = torch.bmm(p_THK.to(cdt), g_TKC)[..., :R]


class _Queries:
    """The latent queries [N, H, R] of a row range: given as they are, or computed block by block from q_nope
    [N, H, N'] and W_UK [H, N', R] (the absorption fused in: the whole [N, H, R] is never stored)."""

    def __init__(self, q_NHX: torch.Tensor, w_HXR: torch.Tensor | None):
        self.q, self.w = q_NHX, w_HXR
        self.shape = q_NHX.shape if w_HXR is None else (*q_NHX.shape[:2], w_HXR.shape[-1])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.q[rows] if self.w is None else torch.einsum("thn,hnr->thr", self.q[rows], self.w)


class _SparseMLA(torch.autograd.Function):
    """Blocks run over the B * T query rows of all batch rows together (decode at batch B: one block of B
    queries, one batched matmul), each query gathering from its own batch row of the flat latents.
    With `w_uk`, the first input is q_nope and each block absorbs its own queries (`_Queries`)."""

    @staticmethod
    def forward(ctx, q_BTHX, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale, w_uk_HXR=None):
        B, T, H, X = q_BTHX.shape
        R = X if w_uk_HXR is None else w_uk_HXR.shape[-1]
        P, K = pe_BSP.shape[-1], idx_BTK.shape[-1]
        N, dev = B * T, q_BTHX.device
        cdt = _compute_dtype(q_BTHX, q_pe_BTHP, kv_BSR, pe_BSP)
        esz = torch.empty((), dtype=cdt).element_size()
        o_NHR = torch.empty(N, H, R, dtype=q_BTHX.dtype, device=dev)
        lse_NH = torch.empty(N, H, dtype=torch.float32, device=dev)
        q_lat_NHR, q_pe_NHP = _Queries(q_BTHX.reshape(N, H, X), w_uk_HXR), q_pe_BTHP.reshape(N, H, P)
        idx_NK = idx_BTK.reshape(N, K)
        tb = _rows_for(_sparse_rows(H, K, R, P, esz, False), N, cap=256)
        S = kv_BSR.shape[1]
        if N * K >= B * S:
            _joint_forward(q_lat_NHR, q_pe_NHP, kv_BSR, pe_BSP, idx_NK, scale, cdt, tb, T, o_NHR, lse_NH)
        else:  # decode and short query chunks: gather from the cache in place, [kv] and [pe] apart
            (kv_NR, per_kv), (pe_NP, per_pe) = _flat_rows(kv_BSR), _flat_rows(pe_BSP)
            gather = _Gather(kv_NR, pe_NP, tb * K)
            for r0 in range(0, N, tb):
                r1 = min(N, r0 + tb)
                p_THK, lse_NH[r0:r1], kv_TKR = _sparse_fwd_block(
                    gather, q_lat_NHR[r0:r1], q_pe_NHP[r0:r1], kv_NR, pe_NP, _trim(idx_NK[r0:r1]), scale, cdt,
                    _row_offsets(r0, r1, T, per_kv, dev), _row_offsets(r0, r1, T, per_pe, dev))
                o_NHR[r0:r1] = torch.bmm(p_THK.to(cdt), kv_TKR)
        lse = lse_NH.view(B, T, H)
        # int32 key indices for the backward: half the memory of the [B, T, K] set (S < 2^31)
        ctx.save_for_backward(q_BTHX, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK.to(torch.int32), lse, w_uk_HXR)
        ctx.scale, ctx.cdt = scale, cdt
        ctx.tb = _rows_for(_sparse_rows(H, K, R, P, esz, True), N, cap=256, budget=BACKWARD_BLOCK_BYTES)
        ctx.mark_non_differentiable(lse)
        return o_NHR.view(B, T, H, R), lse

    @staticmethod
    def backward(ctx, do_BTHR, _dlse):
        """Per block, on the gathered rows g = [kv | pe] (one [K, R+P] matrix per query), three matmuls:
            [q ; do 0] g^T -> scores (recomputed, p = exp(s - lse)) and dp     (2H rows share g)
            ds g       -> [dq_lat | dq_pe]
            [ds ; p]^T [q ; do 0] -> [dkv | dpe] rows, summed in fp32 (`native.c` for bf16, else index_add_
                                     with -1 slots sent to a spill row)
        With `w_uk`, each block's dq_lat becomes dq_nope = dq_lat W_UK^T at once, and dW_UK sums
        q_nope^T dq_lat in fp32.
        """
        q_BTHX, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, lse_BTH, w_uk_HXR = ctx.saved_tensors
        scale, cdt, tb = ctx.scale, ctx.cdt, ctx.tb
        B, T, H, X = q_BTHX.shape
        R = kv_BSR.shape[-1]
        S, P, K = kv_BSR.shape[1], pe_BSP.shape[-1], idx_BTK.shape[-1]
        N, C, dev = B * T, R + P, q_BTHX.device
        need = ctx.needs_input_grad
        src_NC = torch.cat((kv_BSR.to(cdt), pe_BSP.to(cdt)), dim=-1).view(B * S, C)  # one gather per block
        q_NHX, q_pe_NHP, do_NHR = (t.reshape(N, H, -1) for t in (q_BTHX, q_pe_BTHP, do_BTHR))
        q_lat_NHR = _Queries(q_NHX, w_uk_HXR)
        idx_NK, lse_NH = idx_BTK.reshape(N, K), lse_BTH.reshape(N, H)
        g_buf = torch.empty(tb * K, C, dtype=cdt, device=dev)
        x_buf = torch.zeros(tb, 2 * H, C, dtype=cdt, device=dev)  # [q_lat | q_pe ; do | 0]
        # written block by block in the inputs' dtypes (no [N, H, R + P] buffer copied out at the end)
        dq_NHX = torch.zeros(N, H, X, dtype=q_BTHX.dtype, device=dev) if need[0] else None
        dw_HXR = torch.zeros(w_uk_HXR.shape, dtype=torch.float32, device=dev) if need[6] else None
        dq_pe_NHP = torch.zeros(N, H, P, dtype=q_pe_BTHP.dtype, device=dev) if need[1] else None
        dsrc = torch.zeros(B * S + 1, C, dtype=torch.float32, device=dev) if (need[2] or need[3]) else None
        lib = native.bf16_lib(cdt)  # the elementwise steps and the scatter in native.c
        for r0 in range(0, N, tb):
            r1 = min(N, r0 + tb)
            n = r1 - r0
            idx_TK = _trim(idx_NK[r0:r1]).long()
            k = idx_TK.shape[1]
            valid_TK = idx_TK >= 0
            off = _row_offsets(r0, r1, T, S, dev)
            rows_TK = idx_TK.clamp_min(0) if off is None else idx_TK.clamp_min(0) + off
            g_TKC = torch.index_select(src_NC, 0, rows_TK.reshape(-1), out=g_buf[: n * k]).view(n, k, C)
            x = x_buf[:n]  # [scale q_lat | scale q_pe ; do | 0]
            x[:, :H, :R] = _scaled(q_lat_NHR[r0:r1], scale, cdt)
            x[:, :H, R:] = _scaled(q_pe_NHP[r0:r1], scale, cdt)
            x[:, H:, :R] = do_NHR[r0:r1]
            y_T2K = torch.bmm(x, g_TKC.transpose(1, 2))  # [s ; dp]
            if lib is not None:  # the elementwise part in one pass
                lse_TH = _safe_lse(lse_NH[r0:r1])
                lib.dsv32_softmax_bwd_bf16(y_T2K.data_ptr(), lse_TH.data_ptr(), valid_TK.data_ptr(), n, H, k, 1)
                pds_T2K = y_T2K
            else:
                y_T2K = y_T2K.float()
                s_THK = _mask_invalid_(y_T2K[:, :H], valid_TK)
                p_THK = s_THK.sub_(_safe_lse(lse_NH[r0:r1])[..., None]).exp_()  # recomputed from the LSE
                dp_THK = y_T2K[:, H:]
                delta_TH1 = (p_THK * dp_THK).sum(-1, keepdim=True)  # = do . o
                dp_THK.sub_(delta_TH1).mul_(p_THK)  # now ds = dL/ds (of the scaled logits)
                pds_T2K = y_T2K.to(cdt)  # [p ; ds]
            if need[0] or need[1] or need[6]:
                dq_THC = torch.bmm(pds_T2K[:, H:], g_TKC).mul_(scale)
                if need[0] or need[6]:
                    dq_lat_THR = dq_THC[..., :R]
                    if w_uk_HXR is None:
                        dq_NHX[r0:r1] = dq_lat_THR
                    else:
                        if need[0]:
                            dq_NHX[r0:r1] = torch.einsum("thr,hnr->thn", dq_lat_THR, w_uk_HXR)
                        if need[6]:
                            dw_HXR += torch.einsum("thn,thr->hnr", q_NHX[r0:r1].float(), dq_lat_THR.float())
                if need[1]:
                    dq_pe_NHP[r0:r1] = dq_THC[..., R:]
            if dsrc is not None:
                if lib is not None:  # swap the small operand, [do | 0 ; scale q]; fp32 sums of the bf16 rows
                    dg_TKC = torch.bmm(pds_T2K.transpose(1, 2), torch.cat((x[:, H:], x[:, :H]), dim=1))
                    rows = torch.where(valid_TK, rows_TK, -1).reshape(-1)
                    lib.dsv32_scatter_add_bf16(dg_TKC.data_ptr(), rows.data_ptr(), dsrc.data_ptr(), rows.numel(),
                                               C, B * S, native.threads())
                else:  # ds^T q before p^T do, as it always has been (the same fp32 rounding)
                    dg_TKC = torch.bmm(torch.cat((pds_T2K[:, H:], pds_T2K[:, :H]), dim=1).transpose(1, 2), x)
                    spill = torch.where(valid_TK, rows_TK, B * S).reshape(-1)
                    dsrc.index_add_(0, spill, dg_TKC.reshape(-1, C).float())
        dsrc_BSC = None if dsrc is None else dsrc[: B * S].view(B, S, C)
        dq = dq_NHX.view(B, T, H, X) if need[0] else None
        dq_pe = dq_pe_NHP.view(B, T, H, P) if need[1] else None
        dkv = dsrc_BSC[..., :R].to(kv_BSR.dtype) if need[2] else None
        dpe = dsrc_BSC[..., R:].to(pe_BSP.dtype) if need[3] else None
        dw = dw_HXR.to(w_uk_HXR.dtype) if need[6] else None
        return dq, dq_pe, dkv, dpe, None, None, dw


def sparse_mla(q_lat_BTHR: torch.Tensor, q_pe_BTHP: torch.Tensor, kv_BSR: torch.Tensor, pe_BSP: torch.Tensor,
               idx_BTK: torch.Tensor, scale: float) -> torch.Tensor:
    """Sparse MLA over the gathered latents (== reference.sparse_mla_gathered), differentiable. o_lat [B, T, H, R]."""
    return _SparseMLA.apply(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, float(scale), None)[0]


def sparse_mla_absorbed(q_nope_BTHN: torch.Tensor, w_uk_HNR: torch.Tensor, q_pe_BTHP: torch.Tensor,
                        kv_BSR: torch.Tensor, pe_BSP: torch.Tensor, idx_BTK: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """`sparse_mla` of q_lat = q_nope W_UK (per head), the absorption done block by block inside: neither the
    [B, T, H, R] latent queries nor their gradient is stored (R / N times the size of q_nope; 4x in V3 and at
    the `small` preset). Differentiable in q_nope, W_UK, q_pe, kv and pe. o_lat [B, T, H, R].
    fp32 takes the whole einsum, then `sparse_mla`: the rounding fp32 runs (the tiny recipe) have always had."""
    if _compute_dtype(q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP) == torch.float32:
        return sparse_mla(torch.einsum("bthn,hnr->bthr", q_nope_BTHN, w_uk_HNR), q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK,
                          scale)
    return _SparseMLA.apply(q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, float(scale), w_uk_HNR)[0]


def sparse_mla_lse(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_mla` that also returns the log-sum-exp [B, T, H] of the scaled logits (-inf: no valid key)."""
    return _SparseMLA.apply(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, float(scale), None)
