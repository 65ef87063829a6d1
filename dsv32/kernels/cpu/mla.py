"""Sparse MLA over gathered latents as an autograd Function: forward saves the log-sum-exp, backward recomputes."""

from __future__ import annotations


import torch

from .common import _compute_dtype, _rows_for

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


class _Gather:
    """Reusable gather buffers: `index_select(..., out=)` into a preallocated buffer is several times faster
    on CPU than the allocating variant (and than advanced indexing)."""

    def __init__(self, kv_BSR, pe_BSP, rows_max):
        self.kv = torch.empty(rows_max, kv_BSR.shape[-1], dtype=kv_BSR.dtype, device=kv_BSR.device)
        self.pe = torch.empty(rows_max, pe_BSP.shape[-1], dtype=pe_BSP.dtype, device=pe_BSP.device)

    def __call__(self, kv_SR, pe_SP, idx_TK, cdt):
        """Gathered latents [T, K, R], [T, K, P] (cdt, contiguous) and the validity mask of the slots."""
        T, K = idx_TK.shape
        valid_TK = idx_TK >= 0
        rows = idx_TK.clamp_min(0).reshape(-1)  # -1 reads row 0 and is masked: never the last key
        kv = torch.index_select(kv_SR, 0, rows, out=self.kv[: T * K])
        pe = torch.index_select(pe_SP, 0, rows, out=self.pe[: T * K])
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


def _sparse_fwd_block(gather, q_lat_THR, q_pe_THP, kv_SR, pe_SP, idx_TK, scale, cdt):
    kv_TKR, pe_TKP, valid_TK = gather(kv_SR, pe_SP, idx_TK, cdt)
    p_THK, lse_TH = _softmax_lse(_scores(q_lat_THR, q_pe_THP, kv_TKR, pe_TKP, scale, cdt), valid_TK)
    return p_THK, lse_TH, kv_TKR


class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale):
        B, T, H, R = q_lat_BTHR.shape
        P, K = pe_BSP.shape[-1], idx_BTK.shape[-1]
        cdt = _compute_dtype(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP)
        esz = torch.empty((), dtype=cdt).element_size()
        o = torch.empty(B, T, H, R, dtype=q_lat_BTHR.dtype, device=q_lat_BTHR.device)
        lse = torch.empty(B, T, H, dtype=torch.float32, device=q_lat_BTHR.device)
        tb = _rows_for(_sparse_rows(H, K, R, P, esz, False), T, cap=256)
        gather = _Gather(kv_BSR, pe_BSP, tb * K)
        for b in range(B):
            for t0 in range(0, T, tb):
                t1 = min(T, t0 + tb)
                p_THK, lse[b, t0:t1], kv_TKR = _sparse_fwd_block(
                    gather, q_lat_BTHR[b, t0:t1], q_pe_BTHP[b, t0:t1], kv_BSR[b], pe_BSP[b], _trim(idx_BTK[b, t0:t1]),
                    scale, cdt)
                o[b, t0:t1] = torch.bmm(p_THK.to(cdt), kv_TKR)
        ctx.save_for_backward(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, lse)
        ctx.scale, ctx.cdt, ctx.tb = scale, cdt, _rows_for(_sparse_rows(H, K, R, P, esz, True), T, cap=256)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do_BTHR, _dlse):
        """Per block, on the gathered rows g = [kv | pe] (one [K, R+P] matrix per query), three matmuls:
            [q ; do 0] g^T -> scores (recomputed, p = exp(s - lse)) and dp     (2H rows share g)
            ds g       -> [dq_lat | dq_pe]
            [ds ; p]^T [q ; do 0] -> [dkv | dpe] rows, scattered with index_add_ (fp32, -1 slots to a spill row)
        """
        q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, lse_BTH = ctx.saved_tensors
        scale, cdt, tb = ctx.scale, ctx.cdt, ctx.tb
        B, T, H, R = q_lat_BTHR.shape
        S, P, K = kv_BSR.shape[1], pe_BSP.shape[-1], idx_BTK.shape[-1]
        dev = q_lat_BTHR.device
        need = ctx.needs_input_grad
        src_BSC = torch.cat((kv_BSR.to(cdt), pe_BSP.to(cdt)), dim=-1)  # [B, S, R + P], one gather per block
        g_buf = torch.empty(tb * K, R + P, dtype=cdt, device=dev)
        x_buf = torch.zeros(tb, 2 * H, R + P, dtype=cdt, device=dev)  # [q_lat | q_pe ; do | 0]
        dq_BTHC = torch.zeros(B, T, H, R + P, dtype=cdt, device=dev) if (need[0] or need[1]) else None
        dsrc = torch.zeros(B, S + 1, R + P, dtype=torch.float32, device=dev) if (need[2] or need[3]) else None
        for b in range(B):
            for t0 in range(0, T, tb):
                t1 = min(T, t0 + tb)
                n = t1 - t0
                idx_TK = _trim(idx_BTK[b, t0:t1])
                k = idx_TK.shape[1]
                valid_TK = idx_TK >= 0
                g_TKC = torch.index_select(src_BSC[b], 0, idx_TK.clamp_min(0).reshape(-1),
                                           out=g_buf[: n * k]).view(n, k, R + P)
                x = x_buf[:n]  # [scale q_lat | scale q_pe ; do | 0]
                x[:, :H, :R] = _scaled(q_lat_BTHR[b, t0:t1], scale, cdt)
                x[:, :H, R:] = _scaled(q_pe_BTHP[b, t0:t1], scale, cdt)
                x[:, H:, :R] = do_BTHR[b, t0:t1]
                y_T2K = torch.bmm(x, g_TKC.transpose(1, 2)).float()
                s_THK = _mask_invalid_(y_T2K[:, :H], valid_TK)
                p_THK = s_THK.sub_(_safe_lse(lse_BTH[b, t0:t1])[..., None]).exp_()  # recomputed from the LSE
                dp_THK = y_T2K[:, H:]
                delta_TH1 = (p_THK * dp_THK).sum(-1, keepdim=True)  # = do . o
                dp_THK.sub_(delta_TH1).mul_(p_THK)  # now ds = dL/ds (of the scaled logits)
                sp_T2K = y_T2K.to(cdt)  # [ds ; p] after the swap below
                sp_T2K = torch.cat((sp_T2K[:, H:], sp_T2K[:, :H]), dim=1)
                if dq_BTHC is not None:
                    dq_BTHC[b, t0:t1] = torch.bmm(sp_T2K[:, :H], g_TKC).mul_(scale)
                if dsrc is not None:
                    dg_TKC = torch.bmm(sp_T2K.transpose(1, 2), x)  # ds^T scale [q_lat | q_pe] + p^T [do | 0]
                    spill = torch.where(valid_TK, idx_TK, S).reshape(-1)
                    dsrc[b].index_add_(0, spill, dg_TKC.reshape(-1, R + P).float())
        dq_lat = dq_BTHC[..., :R].to(q_lat_BTHR.dtype) if need[0] else None
        dq_pe = dq_BTHC[..., R:].to(q_pe_BTHP.dtype) if need[1] else None
        dkv = dsrc[:, :S, :R].to(kv_BSR.dtype) if need[2] else None
        dpe = dsrc[:, :S, R:].to(pe_BSP.dtype) if need[3] else None
        return dq_lat, dq_pe, dkv, dpe, None, None


def sparse_mla(q_lat_BTHR: torch.Tensor, q_pe_BTHP: torch.Tensor, kv_BSR: torch.Tensor, pe_BSP: torch.Tensor,
               idx_BTK: torch.Tensor, scale: float) -> torch.Tensor:
    """Sparse MLA over the gathered latents (== reference.sparse_mla_gathered), differentiable. o_lat [B, T, H, R]."""
    return _SparseMLA.apply(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, float(scale))[0]


def sparse_mla_lse(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_mla` that also returns the log-sum-exp [B, T, H] of the scaled logits (-inf: no valid key)."""
    return _SparseMLA.apply(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, float(scale))
