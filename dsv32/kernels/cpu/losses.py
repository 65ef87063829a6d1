"""Indexer KL for the two DSA training stages: the sparse target on S_t from the LSE (stage 2) and the
chunked dense target with an online log-sum-exp (stage 1). Gradients reach the indexer only."""

from __future__ import annotations


import torch

from . import common
from .common import _compute_dtype, _rows_for
from .mla import _Gather, _mask_invalid_, _safe_lse, _scores, _sparse_fwd_block, _sparse_rows, _trim

@torch.no_grad()
def sparse_attn_target(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale, lse_BTH=None) -> torch.Tensor:
    """Stage-2 KL target p_BTK (fp32, detached): per-head softmax over the selected set, summed over heads,
    L1-normalised; 0 on -1 slots and on rows with no valid slot. O(T*K*H), block-wise.

    `lse_BTH` (from `sparse_mla_lse`) skips the log-sum-exp; the probabilities are then exp(s - lse).
    """
    B, T, H, R = q_lat_BTHR.shape
    P, K = pe_BSP.shape[-1], idx_BTK.shape[-1]
    cdt = _compute_dtype(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP)
    esz = torch.empty((), dtype=cdt).element_size()
    out = torch.zeros(B, T, K, dtype=torch.float32, device=q_lat_BTHR.device)
    tb = _rows_for(_sparse_rows(H, K, R, P, esz, False), T, cap=256)
    gather = _Gather(kv_BSR, pe_BSP, tb * K)
    for b in range(B):
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            idx_TK = _trim(idx_BTK[b, t0:t1])
            if lse_BTH is None:
                p_THK = _sparse_fwd_block(gather, q_lat_BTHR[b, t0:t1], q_pe_BTHP[b, t0:t1], kv_BSR[b], pe_BSP[b],
                                          idx_TK, scale, cdt)[0]
            else:
                kv_TKR, pe_TKP, valid_TK = gather(kv_BSR[b], pe_BSP[b], idx_TK, cdt)
                s_THK = _mask_invalid_(_scores(q_lat_BTHR[b, t0:t1], q_pe_BTHP[b, t0:t1], kv_TKR, pe_TKP, scale, cdt),
                                       valid_TK)
                p_THK = s_THK.sub_(_safe_lse(lse_BTH[b, t0:t1].float())[..., None]).exp_()
            p_TK = p_THK.sum(1)
            out[b, t0:t1, : idx_TK.shape[1]] = p_TK / p_TK.sum(-1, keepdim=True).clamp_min(1e-10)
    return out


class _IndexerScoresGathered(torch.autograd.Function):
    """I[t, j] = k_scale[s] * sum_h w[t,h] ReLU(q[t,h] . k[s]) at s = idx[t, j] (0 on -1 slots), fp32 [B, T, K].

    Saves only the inputs; backward regathers the keys block by block (no [B, T, K, D] tensor is kept).
    """

    @staticmethod
    def forward(ctx, q_BTHD, w_BTH, k_BSD, k_scale_BS, idx_BTK):
        B, T, H, D = q_BTHD.shape
        K = idx_BTK.shape[-1]
        out = torch.zeros(B, T, K, dtype=torch.float32, device=q_BTHD.device)
        tb = _rows_for(K * (D * 4 + H * 8 + 16), T, cap=256)
        k_buf = torch.empty(tb * K, D, dtype=k_BSD.dtype, device=k_BSD.device)
        for b in range(B):
            for t0 in range(0, T, tb):
                t1 = min(T, t0 + tb)
                idx_TK = idx_BTK[b, t0:t1]
                valid_TK = idx_TK >= 0
                rows = idx_TK.clamp_min(0).reshape(-1)
                k_TKD = torch.index_select(k_BSD[b], 0, rows, out=k_buf[: rows.numel()]).view(t1 - t0, K, D).float()
                logit_THK = torch.bmm(q_BTHD[b, t0:t1].float(), k_TKD.transpose(1, 2)).relu_()
                s_TK = torch.bmm(w_BTH[b, t0:t1].float()[:, None, :], logit_THK).squeeze(1)
                if k_scale_BS is not None:
                    s_TK = s_TK * k_scale_BS[b].float().index_select(0, rows).view(t1 - t0, K)
                out[b, t0:t1] = s_TK.masked_fill_(~valid_TK, 0.0)
        ctx.save_for_backward(q_BTHD, w_BTH, k_BSD, k_scale_BS, idx_BTK)
        ctx.tb = _rows_for(K * (D * 12 + H * 16 + 16), T, cap=256)
        return out

    @staticmethod
    def backward(ctx, dI_BTK):
        q_BTHD, w_BTH, k_BSD, k_scale_BS, idx_BTK = ctx.saved_tensors
        B, T, H, D = q_BTHD.shape
        S, K = k_BSD.shape[1], idx_BTK.shape[-1]
        dq = torch.zeros(B, T, H, D, dtype=torch.float32, device=q_BTHD.device)
        dw = torch.zeros(B, T, H, dtype=torch.float32, device=q_BTHD.device)
        dk = torch.zeros(B, S + 1, D, dtype=torch.float32, device=k_BSD.device)
        dks = torch.zeros(B, S + 1, dtype=torch.float32, device=k_BSD.device) if k_scale_BS is not None else None
        k_buf = torch.empty(ctx.tb * K, D, dtype=k_BSD.dtype, device=k_BSD.device)
        for b in range(B):
            for t0 in range(0, T, ctx.tb):
                t1 = min(T, t0 + ctx.tb)
                n = t1 - t0
                idx_TK = idx_BTK[b, t0:t1]
                valid_TK = idx_TK >= 0
                rows = idx_TK.clamp_min(0).reshape(-1)
                spill = torch.where(valid_TK, idx_TK, S).reshape(-1)
                k_TKD = torch.index_select(k_BSD[b], 0, rows, out=k_buf[: rows.numel()]).view(n, K, D).float()
                q_THD, w_TH = q_BTHD[b, t0:t1].float(), w_BTH[b, t0:t1].float()
                logit_THK = torch.bmm(q_THD, k_TKD.transpose(1, 2))
                relu_THK = logit_THK.relu()
                g_TK = dI_BTK[b, t0:t1].float().masked_fill(~valid_TK, 0.0)
                if k_scale_BS is not None:
                    ksc_TK = k_scale_BS[b].float().index_select(0, rows).view(n, K)
                    u_TK = torch.bmm(w_TH[:, None, :], relu_THK).squeeze(1)  # unscaled score
                    dks[b].index_add_(0, spill, (g_TK * u_TK).reshape(-1))
                    g_TK = g_TK * ksc_TK
                dw[b, t0:t1] = torch.bmm(relu_THK, g_TK[:, :, None]).squeeze(-1)
                dlogit_THK = (logit_THK > 0) * w_TH[:, :, None] * g_TK[:, None, :]
                dq[b, t0:t1] = torch.bmm(dlogit_THK, k_TKD)
                dk[b].index_add_(0, spill, torch.bmm(dlogit_THK.transpose(1, 2), q_THD).reshape(-1, D))
        return (dq.to(q_BTHD.dtype), dw.to(w_BTH.dtype), dk[:, :S].to(k_BSD.dtype),
                None if dks is None else dks[:, :S].to(k_scale_BS.dtype), None)


def indexer_scores_gathered(q_BTHD, w_BTH, k_BSD, k_scale_BS, idx_BTK) -> torch.Tensor:
    """Index logits at the selected slots, fp32 [B, T, K] (0 on -1 slots); gradients reach q, w, k (and k_scale)."""
    return _IndexerScoresGathered.apply(q_BTHD, w_BTH, k_BSD, k_scale_BS, idx_BTK)


def indexer_kl_sparse(index_scores_BTK: torch.Tensor, p_BTK: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """Stage-2 indexer loss: mean over query rows with >= 1 valid slot of KL(p || softmax over valid slots of I).

    `p_BTK` is the (detached) target from `sparse_attn_target`; the gradient reaches `index_scores_BTK` only
    (softmax(I) - p on valid slots, / number of rows). Rows with no valid slot contribute nothing (no NaN).
    """
    valid = idx_BTK >= 0
    row_ok = valid.any(-1)
    s = index_scores_BTK.float().masked_fill(~valid & row_ok[..., None], float("-inf"))
    logq = torch.where(valid, torch.log_softmax(s, dim=-1), 0.0)
    p = torch.where(valid, p_BTK.detach().float(), 0.0)
    kl_row = (torch.xlogy(p, p) - p * logq).sum(-1)
    n = row_ok.sum()
    return (kl_row * row_ok).sum() / n.clamp_min(1)




def _indexer_logits_block(q_THD, w_TH, k_SD, k_scale_S):
    """fp32 (logits [T, H, S], unscaled scores [T, S], scores [T, S]) of the indexer, for its backward."""
    logit_THS = torch.einsum("thd,sd->ths", q_THD, k_SD)
    u_TS = torch.bmm(w_TH[:, None, :], logit_THS.relu()).squeeze(1)
    return logit_THS, u_TS, (u_TS if k_scale_S is None else u_TS * k_scale_S)


class _DenseTargetKL(torch.autograd.Function):
    """Scalar stage-1 KL; the indexer gradients are computed during the forward (block by block, the loss is a
    scalar) and scaled by the incoming gradient in backward, so the dense attention is evaluated twice, not three
    times. Only the indexer inputs get gradients; the attention inputs are targets (detached)."""

    @staticmethod
    def forward(ctx, iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, ks_BT, ke_BT,
                scale, q_block, k_block, grad_enabled):
        B, T, H, R = q_lat_BTHR.shape
        S = kv_BSR.shape[1]
        HI, D = iq_BTHD.shape[2], iq_BTHD.shape[3]
        dev = q_lat_BTHR.device
        grads = grad_enabled and any(ctx.needs_input_grad[:4])
        ks_BT = ks_BT.to(torch.int64).clamp(0, S)
        ke_BT = ke_BT.to(torch.int64).clamp(0, S)
        n_rows = int((ke_BT > ks_BT).sum())
        kb = k_block or max(64, min(S, common.BLOCK_BYTES // (4 * 256 * (H + 2 * HI + 4))))
        tb = q_block or _rows_for(kb * 4 * (3 * H + 3 * HI + 8), T, cap=256)
        if grads:
            dq = torch.zeros(B, T, HI, D, dtype=torch.float32, device=dev)
            dw = torch.zeros(B, T, HI, dtype=torch.float32, device=dev)
            dk = torch.zeros(B, S, D, dtype=torch.float32, device=dev)
            dks = torch.zeros(B, S, dtype=torch.float32, device=dev) if ik_scale_BS is not None else None
        total = torch.zeros((), dtype=torch.float64, device=dev)
        ninf = float("-inf")
        for b in range(B):
            kv_SR, pe_SP, ik_SD = kv_BSR[b].float(), pe_BSP[b].float(), ik_BSD[b].float()
            iks_S = None if ik_scale_BS is None else ik_scale_BS[b].float()
            for t0 in range(0, T, tb):
                t1 = min(T, t0 + tb)
                ks_T, ke_T = ks_BT[b, t0:t1], ke_BT[b, t0:t1]
                lo, hi = int(ks_T.min()), int(ke_T.max())
                if hi <= lo:
                    continue
                ql, qp = q_lat_BTHR[b, t0:t1].float(), q_pe_BTHP[b, t0:t1].float()
                iq, iw = iq_BTHD[b, t0:t1].float(), iw_BTH[b, t0:t1].float()
                n = t1 - t0

                def block(s0, s1):
                    pos = torch.arange(s0, s1, device=dev)
                    valid_TS = (pos >= ks_T[:, None]) & (pos < ke_T[:, None])
                    a_THS = (torch.einsum("thr,sr->ths", ql, kv_SR[s0:s1])
                             + torch.einsum("thp,sp->ths", qp, pe_SP[s0:s1])) * scale
                    a_THS.masked_fill_(~valid_TS[:, None, :], ninf)
                    logit_THS, u_TS, i_TS = _indexer_logits_block(
                        iq, iw, ik_SD[s0:s1], None if iks_S is None else iks_S[s0:s1])
                    return valid_TS, a_THS, logit_THS, u_TS, i_TS.masked_fill(~valid_TS, ninf)

                # pass 1: online log-sum-exp over key blocks (per head for attention, and for the index scores)
                m_a = torch.full((n, H), ninf, device=dev)
                l_a = torch.zeros(n, H, device=dev)
                m_i = torch.full((n,), ninf, device=dev)
                l_i = torch.zeros(n, device=dev)
                spans = [(s0, min(hi, s0 + kb)) for s0 in range(lo, hi, kb)]
                cached = None
                for s0, s1 in spans:
                    blk = block(s0, s1)
                    _, a_THS, _, _, i_TS = blk
                    m_new = torch.maximum(m_a, a_THS.amax(-1))
                    m_safe = m_new.masked_fill(m_new == ninf, 0.0)
                    l_a = l_a * torch.exp(m_a - m_safe) + torch.exp(a_THS - m_safe[..., None]).sum(-1)
                    m_a = m_new
                    mi_new = torch.maximum(m_i, i_TS.amax(-1))
                    mi_safe = mi_new.masked_fill(mi_new == ninf, 0.0)
                    l_i = l_i * torch.exp(m_i - mi_safe) + torch.exp(i_TS - mi_safe[:, None]).sum(-1)
                    m_i = mi_new
                    if len(spans) == 1:
                        cached = blk
                lse_a = _safe_lse(m_a + torch.log(l_a))  # rows with no valid key: +inf -> p = 0
                lse_i = _safe_lse(m_i + torch.log(l_i))
                # pass 2: target p, log q, KL terms and d KL / d I = (q - p) / n_rows
                for s0, s1 in spans:
                    valid_TS, a_THS, logit_THS, u_TS, i_TS = cached if cached is not None else block(s0, s1)
                    p_TS = torch.exp(a_THS - lse_a[..., None]).sum(1) / H
                    logq_TS = i_TS - lse_i[:, None]
                    kl = torch.xlogy(p_TS, p_TS) - torch.where(valid_TS, p_TS * logq_TS, 0.0)
                    total += kl.sum(dtype=torch.float64)
                    if not grads:
                        continue
                    g_TS = torch.where(valid_TS, torch.exp(logq_TS) - p_TS, 0.0) / max(n_rows, 1)
                    if iks_S is not None:
                        dks[b, s0:s1] += (g_TS * u_TS).sum(0)
                        g_TS = g_TS * iks_S[s0:s1]
                    dw[b, t0:t1] += torch.einsum("ths,ts->th", logit_THS.relu(), g_TS)
                    dlogit_THS = (logit_THS > 0) * iw[:, :, None] * g_TS[:, None, :]
                    dq[b, t0:t1] += torch.einsum("ths,sd->thd", dlogit_THS, ik_SD[s0:s1])
                    dk[b, s0:s1] += torch.einsum("ths,thd->sd", dlogit_THS, iq)
        if grads:
            ctx.save_for_backward(dq, dw, dk, dks if dks is not None else torch.empty(0))
            ctx.has_dks = dks is not None
            ctx.dtypes = (iq_BTHD.dtype, iw_BTH.dtype, ik_BSD.dtype,
                          None if ik_scale_BS is None else ik_scale_BS.dtype)
        return (total / max(n_rows, 1)).float()

    @staticmethod
    def backward(ctx, g):
        dq, dw, dk, dks = ctx.saved_tensors
        dt = ctx.dtypes
        return ((dq * g).to(dt[0]), (dw * g).to(dt[1]), (dk * g).to(dt[2]),
                (dks * g).to(dt[3]) if ctx.has_dks else None) + (None,) * 10


def dense_attn_target_kl(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, scale, iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS,
                         ks_BT, ke_BT, q_block: int | None = None, k_block: int | None = None) -> torch.Tensor:
    """Stage-1 indexer loss (dsa-anchors.md §1.9): mean over query rows with a visible key of
    KL(p_t || softmax_{V_t}(I_t)), with V_t = [ks, ke), p_t = L1-normalised head sum of the per-head dense
    softmax of MLA (absorbed form: s = (q_lat . kv + q_pe . pe) * scale) and I_t the index logits of
    (iq, iw, ik, ik_scale) as in `reference.indexer_scores`.

    Computed block by block over queries (q_block rows) with an online log-sum-exp over key blocks
    (k_block keys), so no [T, S] tensor exists; fp32 throughout. Gradients reach only iq, iw, ik and
    ik_scale (the indexer); the attention inputs are the target and get none. Scalar fp32.
    """
    return _DenseTargetKL.apply(iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, q_lat_BTHR.detach(), q_pe_BTHP.detach(),
                                kv_BSR.detach(), pe_BSP.detach(), ks_BT, ke_BT, float(scale), q_block, k_block,
                                torch.is_grad_enabled())
