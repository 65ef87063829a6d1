"""Indexer scores + top-k per query block (no L x L tensor); exactly the reference's sets in fp32, each set in
ascending index order."""

from __future__ import annotations

import math

import torch

from . import native
from .common import INVALID, _I64_MIN, _LOW32, _compute_dtype, _rows_for

_KEY_TILE = 2048  # keys per scoring tile: the [rows * H, tile] logits stay in cache
_SAMPLE_HITS = 128  # prefilter: expected top-k members in the strided sample of a row
_NATIVE_TILE_BYTES = 1 << 20  # native epilogue: bf16 logits per key tile (stays in L2 for the fused pass)


def _block_scores(q_bTHD: torch.Tensor, w_bTH: torch.Tensor, k_bSD: torch.Tensor, k_scale_bS: torch.Tensor | None,
                  cdt: torch.dtype) -> torch.Tensor:
    """fp32 [b * T, S] index scores of b batch rows' query blocks against their key slices, tile by tile over keys.

    fp32: the same arithmetic as `reference.indexer_scores` (bit-identical). bf16: logits from the bf16
    matmul (fp32 accumulation, rounded to bf16), ReLU, then the head-weighted sum in fp32 (fused in one pass
    by `native.c` when it is built, else PyTorch ops). Several batch rows in one call (decode: b rows of
    one query each) share one top-k afterwards.
    """
    b, T, H, D = q_bTHD.shape
    S = k_bSD.shape[1]
    q_bXD = q_bTHD.to(cdt).reshape(b, T * H, D)
    out_bTS = torch.empty(b, T, S, dtype=torch.float32, device=q_bTHD.device)
    lib = native.bf16_lib(cdt)
    if lib is not None:
        w_bTH = w_bTH.float().contiguous()
        k_scale_bS = None if k_scale_bS is None else k_scale_bS.float().contiguous()
        tile = max(256, _NATIVE_TILE_BYTES // (T * H * 2))
        for i in range(b):
            for s0 in range(0, S, tile):
                s1 = min(S, s0 + tile)
                logits_XS = q_bXD[i] @ k_bSD[i, s0:s1].to(cdt).T
                lib.dsv32_index_epilogue(logits_XS.data_ptr(), w_bTH[i].data_ptr(),
                                         None if k_scale_bS is None else k_scale_bS[i, s0:].data_ptr(),
                                         out_bTS[i, :, s0:].data_ptr(), T, H, s1 - s0, S, 1)
        return out_bTS.view(b * T, S)
    w_bT1H = w_bTH.float().reshape(b, T, 1, H)
    tile = max(_KEY_TILE, (2 << 20) // (T * H * 6))  # ~2 MB of logits per tile; decode: one tile
    for i in range(b):  # one mm per batch row: bf16 bmm with few rows is ~10x slower than mm on CPU
        for s0 in range(0, S, tile):
            s1 = min(S, s0 + tile)
            logits_THS = (q_bXD[i] @ k_bSD[i, s0:s1].to(cdt).T).view(T, H, s1 - s0).relu_()
            tile_TS = torch.bmm(w_bT1H[i], logits_THS.float()).squeeze(1)
            if k_scale_bS is not None:
                tile_TS = tile_TS * k_scale_bS[i, s0:s1].float()
            out_bTS[i, :, s0:s1] = tile_TS
    return out_bTS.view(b * T, S)


def _orderable32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int32 with the same order and the same ties (reference._orderable, in int32)."""
    bits = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _keys(scores: torch.Tensor, rev_pos: torch.Tensor) -> torch.Tensor:
    """int64 sort keys of reference.select_topk: score first, then lower index. rev_pos = S - 1 - index,
    so the index is S - 1 - (key & LOW32)."""
    return torch.add(rev_pos, _orderable32(scores).to(torch.int64), alpha=1 << 32)


def _direct_keys(scores_TS: torch.Tensor, rev_pos: torch.Tensor) -> torch.Tensor:
    """Sort keys of whole rows; keys that are not visible (score -inf) become _I64_MIN."""
    return _keys(scores_TS, rev_pos).masked_fill_(scores_TS == float("-inf"), _I64_MIN)


def _select(keys_TN: torch.Tensor, k: int, S: int, out_TK: torch.Tensor) -> None:
    """Indices of each row's k largest keys into out_TK[:, :k], ascending index, -1 padded.

    Columns of `keys_TN` run in ascending key index and keys are distinct apart from _I64_MIN (no key),
    so the keys >= the k-th largest are exactly the top k, already in index order: an unsorted top-k
    finds the threshold (about 4x cheaper than a sorted one at k = 2048) and a mask compacts the rows.
    """
    T, N = keys_TN.shape
    k = min(k, N)
    kth = keys_TN.topk(k, dim=-1, sorted=False).values.amin(-1)
    sel = keys_TN >= kth[:, None]
    sel &= keys_TN != _I64_MIN
    out = out_TK[:, :k]
    if bool((kth != _I64_MIN).all()):  # every row has k keys: a plain row-major compaction
        torch.sub(S - 1, keys_TN.masked_select(sel).view(T, k) & _LOW32, out=out)  # ~2x faster than keys_TN[sel]
        return
    r, c = sel.nonzero(as_tuple=True)
    counts = torch.bincount(r, minlength=T)
    slot = torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]
    out.fill_(INVALID)
    out[r, slot] = (S - 1) - (keys_TN[r, c] & _LOW32)


def _topk_block(scores_TS: torch.Tensor, lo: int, ks_T: torch.Tensor, ke_T: torch.Tensor, out_TK: torch.Tensor,
                S: int, prefilter: bool = True) -> None:
    """`reference.select_topk` for a block whose visible keys all lie in [lo, lo + Sb); writes out_TK [T, k_out].

    `scores_TS` is overwritten (-inf outside each row's [ks, ke)). Long rows are prefiltered exactly: the
    threshold tau = j-th largest of a strided sample (every m-th key, j a bit above k/m) is checked to
    leave >= min(k, n_valid) keys per row (rows where it does not go the direct way); every top-k key
    scores >= tau, so the int64 (score, -index) top-k over the ~1.3 k candidates equals the full one.
    The set is written in ascending index order (`_select`). `native.c` does the same in one C call (a
    radix select over the candidates) when it is built; it reads `scores_TS` and leaves it as it is.
    """
    T, Sb = scores_TS.shape
    k_out = out_TK.shape[1]
    dev = scores_TS.device
    lib = native.lib()
    if lib is not None and k_out > 0:
        ks_T, ke_T = ks_T.contiguous(), ke_T.contiguous()
        lib.dsv32_topk_rows(scores_TS.data_ptr(), scores_TS.stride(0), T, lo, lo + Sb, ks_T.data_ptr(),
                            ke_T.data_ptr(), k_out, out_TK.data_ptr(), out_TK.stride(0),
                            _SAMPLE_HITS if prefilter else 0, native.threads())
        return
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
    if prefilter and m >= 4 and Sb >= 4 * k:
        sample = scores_TS[:, ::m]
        e = k / m
        j = min(sample.shape[1], int(e + 3 * math.sqrt(e)) + 8)
        tau = sample.topk(j, dim=-1, sorted=False).values.amin(-1).clamp_min(torch.finfo(torch.float32).min)
        # Candidates as flat positions r * Sb + col, row-major (a 1-D nonzero and 1-D gathers and scatters:
        # cheaper on CPU than a 2-D nonzero and (row, column) advanced indexing).
        flat = (scores_TS >= tau[:, None]).view(-1).nonzero().view(-1)
        r = flat.div(Sb, rounding_mode="floor")
        counts = torch.bincount(r, minlength=T)
        bad = counts < n_valid.clamp(max=k)  # sample threshold too high for this row (rare): go direct
        rows_bad = None
        if bool(bad.any()):
            rows_bad = bad.nonzero().squeeze(1)
            keep = ~bad[r]
            flat, r = flat[keep], r[keep]
            counts[rows_bad] = 0
        cmax = int(counts.max())
        if cmax <= Sb // 2:
            W = max(cmax, k)
            slot = torch.arange(r.numel(), device=dev) - (counts.cumsum(0) - counts)[r]
            col = flat - r * Sb
            keys = _keys(scores_TS.view(-1).index_select(0, flat), rev_pos.index_select(0, col))
            buf = torch.full((T * W,), _I64_MIN, dtype=torch.int64, device=dev)
            buf.index_copy_(0, r * W + slot, keys)  # ascending index within each row
            _select(buf.view(T, W), k, S, out_TK)
            if rows_bad is not None:
                part = torch.full((rows_bad.numel(), k), INVALID, dtype=torch.int64, device=dev)
                _select(_direct_keys(scores_TS[rows_bad], rev_pos), k, S, part)
                out_TK[rows_bad, :k] = part
            return
    _select(_direct_keys(scores_TS, rev_pos), k, S, out_TK)


@torch.no_grad()
def indexer_topk(q_BTHD: torch.Tensor, w_BTH: torch.Tensor, k_BSD: torch.Tensor, k_scale_BS: torch.Tensor | None,
                 ks_BT: torch.Tensor, ke_BT: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k key indices per query, int64 [B, T, min(topk, S)], ascending, -1 padded
    (== reference.ascending(reference.select_topk(scores))).

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
    # per query row: fp32 scores, masks, int64 keys (direct path); the logits are per key tile. The native
    # path keeps only the scores (the selection works in place).
    per_row = S * 4 if native.lib() is not None else S * (4 + 1 + 8 + 8) + H * _KEY_TILE * 8
    tb = _rows_for(per_row, B * T, cap=256)
    # Short query blocks (decode, small chunks): nb batch rows share one block and one top-k over all
    # their rows (each row keeps its own [ks, ke)).
    nb = max(1, tb // T)
    for b0 in range(0, B, nb):
        b1 = min(B, b0 + nb)
        step = T if b1 - b0 > 1 else min(T, tb)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            ks_N, ke_N = ks_BT[b0:b1, t0:t1].reshape(-1), ke_BT[b0:b1, t0:t1].reshape(-1)
            lo, hi = int(ks_N.min()), int(ke_N.max())
            if hi <= lo:
                continue
            scores_NS = _block_scores(q_BTHD[b0:b1, t0:t1], w_BTH[b0:b1, t0:t1], k_BSD[b0:b1, lo:hi],
                                      None if k_scale_BS is None else k_scale_BS[b0:b1, lo:hi], cdt)
            _topk_block(scores_NS, lo, ks_N, ke_N, out[b0:b1, t0:t1].view(-1, k_out), S)  # a view: written in place
    return out
