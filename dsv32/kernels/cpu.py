"""CPU fast path of DeepSeek Sparse Attention: chunked, no L x L tensor (dsa-anchors.md §7.1 items 4-6, §7.3).

Same ops and shapes as `reference.py` (legend there), plus the training helpers of the indexer KL:

    indexer_topk(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, topk) -> idx_BTK
        Scores and top-k block by block over queries: a block scores only its key range
        [min ks, max ke) (causal prefill skips the future), tile by tile over keys, and selects at
        once, so at most O(block * S) scores are alive. fp32 inputs give exactly
        `reference.select_topk(reference.indexer_scores(...))` (same sets, same order, same tie rule);
        bf16 inputs use the bf16 matmul (fp32 accumulation, bf16-rounded logits) and the ReLU-weighted
        head sum in fp32. Long rows are prefiltered exactly (a sampled threshold, checked per row) so
        that only ~1.3 k candidates per row are sorted. NaN scores: order unspecified.
    sparse_mla(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale) -> o_lat_BTHR
        Gathered MQA/absorbed attention as an autograd Function. Forward per query block: `index_select`
        of the kv / pe rows into reused buffers, scores = one [H, R+P] x [R+P, K] product per query
        (batched over the block; the K rows are shared by all H heads), fp32 softmax, o = p x kv. Saves the
        inputs, idx and the log-sum-exp [B, T, H]. Backward recomputes p = exp(s - lse) on the selected
        set only and needs three matmuls per block on g = [kv | pe] rows: [q ; do] g^T (scores and dp
        together), ds g (dq), [ds ; p]^T [q ; do] (dkv | dpe rows, scattered with index_add_ in fp32).
        bf16 inputs: bf16 matmuls (scores rounded to bf16), softmax and accumulation in fp32.

Training helpers (dsa-anchors.md §1.9). Stage 2 (sparse), gradients to the indexer only:

    o, lse = sparse_mla_lse(q_lat, q_pe, kv, pe, idx, scale)                  # main attention
    p = sparse_attn_target(q_lat, q_pe, kv, pe, idx, scale, lse_BTH=lse)      # detached target, O(L*k*H)
    I = indexer_scores_gathered(iq, iw, ik, ik_scale, idx)                    # [B, T, K], differentiable
    loss = indexer_kl_sparse(I, p, idx)

Stage 1 (dense warm-up): `dense_attn_target_kl(q_lat, q_pe, kv, pe, scale, iq, iw, ik, ik_scale, ks, ke)`,
block by block over queries with an online log-sum-exp over key blocks.

Everything loops over batch rows and query blocks in Python; each block is a handful of large ops on
contiguous operands. Block sizes come from a byte budget (`BLOCK_BYTES`): beyond tensors the size of
the inputs (gradients, the [B, S, R+P] latents of the backward), peak memory is O(BLOCK_BYTES).
"""

from __future__ import annotations

import math

import torch

from . import reference as ref

INVALID = ref.INVALID
BLOCK_BYTES = 32 << 20  # working set per block (scores, gathered latents, ...)
_I64_MIN = torch.iinfo(torch.int64).min
_LOW32 = 0xFFFFFFFF


def _rows_for(per_row_bytes: int, n: int, cap: int = 1024) -> int:
    """Rows per block so that a block's working set stays within BLOCK_BYTES."""
    return max(1, min(n, cap, BLOCK_BYTES // max(1, per_row_bytes)))


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """bf16/fp16 when every operand has it (matmuls accumulate in fp32, outputs are rounded), else fp32.
    FP8 operands (an FP8 index-key cache) convert exactly to bf16, so they do not force fp32."""
    dts = {t.dtype for t in ts}
    if torch.bfloat16 in dts:
        dts -= set(_FP8)
    if len(dts) == 1 and next(iter(dts)) in (torch.bfloat16, torch.float16):
        return next(iter(dts))
    return torch.float32


# ----------------------------------------------------------------------------------------------
# Indexer: scores + top-k per query block
# ----------------------------------------------------------------------------------------------


_KEY_TILE = 2048  # keys per scoring tile: the [rows * H, tile] logits stay in cache
_SAMPLE_HITS = 128  # prefilter: expected top-k members in the strided sample of a row


def _block_scores(q_THD: torch.Tensor, w_TH: torch.Tensor, k_SD: torch.Tensor, k_scale_S: torch.Tensor | None,
                  cdt: torch.dtype) -> torch.Tensor:
    """fp32 [T, S] index scores of a query block against a key slice, tile by tile over keys.

    fp32: the same arithmetic as `reference.indexer_scores` (bit-identical). bf16: logits from the bf16
    matmul (fp32 accumulation, rounded to bf16), ReLU, then the head-weighted sum in fp32.
    """
    T, H, D = q_THD.shape
    S = k_SD.shape[0]
    q_XD = q_THD.to(cdt).reshape(T * H, D)
    w_T1H = w_TH.float()[:, None, :]
    out_TS = torch.empty(T, S, dtype=torch.float32, device=q_THD.device)
    tile = max(_KEY_TILE, (2 << 20) // (T * H * 6))  # ~2 MB of logits per tile; decode: one tile
    for s0 in range(0, S, tile):
        s1 = min(S, s0 + tile)
        logits_THS = (q_XD @ k_SD[s0:s1].to(cdt).T).view(T, H, s1 - s0).relu_()
        tile_TS = torch.bmm(w_T1H, logits_THS.float()).squeeze(1)
        if k_scale_S is not None:
            tile_TS = tile_TS * k_scale_S[s0:s1].float()
        out_TS[:, s0:s1] = tile_TS
    return out_TS


def _orderable32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int32 with the same order and the same ties (reference._orderable, in int32)."""
    bits = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _keys(scores: torch.Tensor, rev_pos: torch.Tensor) -> torch.Tensor:
    """int64 sort keys of reference.select_topk: score first, then lower index. rev_pos = S - 1 - index,
    so the index is S - 1 - (key & LOW32)."""
    return torch.add(rev_pos, _orderable32(scores).to(torch.int64), alpha=1 << 32)


def _direct_topk(scores_TS: torch.Tensor, rev_pos: torch.Tensor, k: int) -> torch.Tensor:
    return _keys(scores_TS, rev_pos).topk(k, dim=-1).values


def _topk_block(scores_TS: torch.Tensor, lo: int, ks_T: torch.Tensor, ke_T: torch.Tensor, out_TK: torch.Tensor,
                S: int, prefilter: bool = True) -> None:
    """`reference.select_topk` for a block whose visible keys all lie in [lo, lo + Sb); writes out_TK [T, k_out].

    `scores_TS` is overwritten (-inf outside each row's [ks, ke)). Long rows are prefiltered exactly: the
    threshold tau = j-th largest of a strided sample (every m-th key, j a bit above k/m) is checked to
    leave >= min(k, n_valid) keys per row (rows where it does not go the direct way); every top-k key
    scores >= tau, so the int64 (score, -index) top-k over the ~1.3 k candidates equals the full one.
    """
    T, Sb = scores_TS.shape
    k_out = out_TK.shape[1]
    dev = scores_TS.device
    ninf = float("-inf")
    hi = lo + Sb
    n_valid = (ke_T - ks_T).clamp_min(0)
    # Columns [a, c) are visible to every row; mask only the edges (for causal blocks: a T x T triangle).
    a, c = max(lo, int(ks_T.max())), min(hi, int(ke_T.min()))
    if a > lo:
        scores_TS[:, : a - lo].masked_fill_(torch.arange(lo, a, device=dev) < ks_T[:, None], ninf)
    if c < hi:
        scores_TS[:, c - lo:].masked_fill_(torch.arange(c, hi, device=dev) >= ke_T[:, None], ninf)
    rev_pos = torch.arange(S - 1 - lo, S - 1 - hi, -1, device=dev)
    k = min(k_out, Sb)
    m = max(1, k // _SAMPLE_HITS)
    top = None
    if prefilter and m >= 4 and Sb >= 4 * k:
        sample = scores_TS[:, ::m]
        e = k / m
        j = min(sample.shape[1], int(e + 3 * math.sqrt(e)) + 8)
        tau = sample.topk(j, dim=-1, sorted=False).values.amin(-1).clamp_min(torch.finfo(torch.float32).min)
        r, col = (scores_TS >= tau[:, None]).nonzero(as_tuple=True)  # candidates, row-major
        counts = torch.bincount(r, minlength=T)
        bad = counts < n_valid.clamp(max=k)  # sample threshold too high for this row (rare): go direct
        rows_bad = None
        if bool(bad.any()):
            rows_bad = bad.nonzero().squeeze(1)
            keep = ~bad[r]
            r, col = r[keep], col[keep]
            counts[rows_bad] = 0
        cmax = int(counts.max())
        if cmax <= Sb // 2:
            if cmax == 0:
                top = torch.full((T, k), _I64_MIN, dtype=torch.int64, device=dev)
            else:
                slot = torch.arange(r.numel(), device=dev) - (counts.cumsum(0) - counts)[r]
                buf = torch.full((T, max(cmax, k)), _I64_MIN, dtype=torch.int64, device=dev)
                buf[r, slot] = _keys(scores_TS[r, col], rev_pos[col])
                top = buf.topk(k, dim=-1).values
            if rows_bad is not None:
                top[rows_bad] = _direct_topk(scores_TS[rows_bad], rev_pos, k)
    if top is None:
        top = _direct_topk(scores_TS, rev_pos, k)
    idx = (S - 1) - (top & _LOW32)
    slot = torch.arange(k, device=dev)
    out_TK[:, :k] = idx.masked_fill_((slot >= n_valid[:, None]) | (top == _I64_MIN), INVALID)


@torch.no_grad()
def indexer_topk(q_BTHD: torch.Tensor, w_BTH: torch.Tensor, k_BSD: torch.Tensor, k_scale_BS: torch.Tensor | None,
                 ks_BT: torch.Tensor, ke_BT: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k key indices per query, int64 [B, T, min(topk, S)], -1 padded (== reference.select_topk of the scores).

    Query blocks are sized so that a block's scores and sort keys fit BLOCK_BYTES; a block scores only
    keys in [min ks, max ke) of its queries. Decode (T = 1) reads the slice of the key cache it needs.
    """
    B, T, H, D = q_BTHD.shape
    S = k_BSD.shape[1]
    k_out = min(topk, S)
    out = torch.full((B, T, k_out), INVALID, dtype=torch.int64, device=q_BTHD.device)
    if k_out == 0 or T == 0:
        return out
    cdt = _compute_dtype(q_BTHD, k_BSD)
    ks_BT = ks_BT.to(torch.int64).clamp(0, S)
    ke_BT = ke_BT.to(torch.int64).clamp(0, S)
    # per query row: fp32 scores, masks, int64 keys (direct path); the logits are per key tile
    tb = _rows_for(S * (4 + 1 + 8 + 8) + H * _KEY_TILE * 8, T, cap=256)
    for b in range(B):
        k_SD = k_BSD[b]
        ks_b, ke_b = ks_BT[b], ke_BT[b]
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            ks_T, ke_T = ks_b[t0:t1], ke_b[t0:t1]
            lo, hi = int(ks_T.min()), int(ke_T.max())
            if hi <= lo:
                continue
            scores_TS = _block_scores(q_BTHD[b, t0:t1], w_BTH[b, t0:t1], k_SD[lo:hi],
                                      None if k_scale_BS is None else k_scale_BS[b, lo:hi], cdt)
            _topk_block(scores_TS, lo, ks_T, ke_T, out[b, t0:t1], S)
    return out


# ----------------------------------------------------------------------------------------------
# Sparse MLA (absorbed / MQA mode) over gathered latents
# ----------------------------------------------------------------------------------------------


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
        S, P, K = kv_BSR.shape[1], pe_BSP.shape[-1], idx_BTK.shape[-1]
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


# ----------------------------------------------------------------------------------------------
# Indexer KL, stage 2 (sparse): target on the selected set, index logits at the selected slots
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Indexer KL, stage 1 (dense warm-up): target = head-summed dense attention over [ks, ke)
# ----------------------------------------------------------------------------------------------


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
        S, P = kv_BSR.shape[1], pe_BSP.shape[-1]
        HI, D = iq_BTHD.shape[2], iq_BTHD.shape[3]
        dev = q_lat_BTHR.device
        grads = grad_enabled and any(ctx.needs_input_grad[:4])
        ks_BT = ks_BT.to(torch.int64).clamp(0, S)
        ke_BT = ke_BT.to(torch.int64).clamp(0, S)
        n_rows = int((ke_BT > ks_BT).sum())
        kb = k_block or max(64, min(S, BLOCK_BYTES // (4 * 256 * (H + 2 * HI + 4))))
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
