"""Plain-PyTorch reference ops for DeepSeek Sparse Attention: the ground truth every fast path matches.

Legend (shape suffixes):
    B batch, T query tokens, S key tokens (cache length), H heads, D indexer head dim,
    R kv latent rank (kv_lora_rank), P rope dims, K selected keys per query (top-k).

Key validity is given per query as a half-open range `[ks, ke)` of absolute key positions
(causal: ke = position + 1; packed documents: ks = start of the query's document). This is the
`cu_seqlen_ks/ke` convention of DeepGEMM / vLLM / SGLang, so chunked prefill and decode need no
special cases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INVALID = -1  # top-k slot with no key (never used as an index: PyTorch would wrap it to the last key)


def valid_mask(ks_BT: torch.Tensor, ke_BT: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T, S] bool: key s is visible to query t."""
    s = torch.arange(S, device=ks_BT.device)
    return (s >= ks_BT[..., None]) & (s < ke_BT[..., None])


def indexer_scores(q_BTHD: torch.Tensor, w_BTH: torch.Tensor, k_BSD: torch.Tensor,
                   k_scale_BS: torch.Tensor | None = None, block: int = 256) -> torch.Tensor:
    """Lightning-indexer logits `I[t,s] = k_scale[s] * sum_h w[t,h] * ReLU(q[t,h] . k[s])`, fp32 [B, T, S].

    `w` already carries H^-1/2 * D^-1/2 (and the FP8 q scales when quantised); the ReLU comes before the
    weighting and w may be negative (dsa-anchors.md §1.3 step 8). Computed in blocks of queries so the
    [B, T, H, S] intermediate never exists whole.
    """
    k_BSD = k_BSD.float()
    out = []
    for t0 in range(0, q_BTHD.shape[1], block):
        q = q_BTHD[:, t0:t0 + block].float()
        logits_BTHS = torch.einsum("bthd,bsd->bths", q, k_BSD).relu()
        out.append(torch.einsum("bths,bth->bts", logits_BTHS, w_BTH[:, t0:t0 + block].float()))
    scores_BTS = torch.cat(out, dim=1)
    if k_scale_BS is not None:
        scores_BTS = scores_BTS * k_scale_BS.float()[:, None, :]
    return scores_BTS


def _orderable(x: torch.Tensor) -> torch.Tensor:
    """Map fp32 to int64 with the same order (so ties can be broken by a secondary key)."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def select_topk(scores_BTS: torch.Tensor, ks_BT: torch.Tensor, ke_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k keys per query among the valid ones: int64 [B, T, min(k, S)], sorted by score, -1 padded.

    |S_t| = min(k, number of valid keys); ties go to the lowest index (deterministic, so top-k sets agree
    across runs, devices and cache layouts; dsa-anchors.md §4.3 on exact-0 plateaus).
    """
    S = scores_BTS.shape[-1]
    k = min(k, S)
    s = torch.arange(S, device=scores_BTS.device)
    valid_BTS = valid_mask(ks_BT, ke_BT, S)
    # Primary key: the score; secondary: lower index first. Invalid keys sort below everything.
    key_BTS = (_orderable(scores_BTS) << 32) | (S - 1 - s)
    key_BTS = key_BTS.masked_fill(~valid_BTS, torch.iinfo(torch.int64).min)
    idx_BTK = key_BTS.topk(k, dim=-1).indices
    n_valid_BT = valid_BTS.sum(-1)
    slot = torch.arange(k, device=scores_BTS.device)
    return idx_BTK.masked_fill(slot >= n_valid_BT[..., None], INVALID)


def ascending(idx_BTK: torch.Tensor) -> torch.Tensor:
    """The same top-k sets in ascending index order, -1 slots last: backends may order a set as they like
    (the cpu backend returns this order), so compare sets through this."""
    big = torch.iinfo(idx_BTK.dtype).max
    out = torch.where(idx_BTK < 0, big, idx_BTK).sort(dim=-1).values
    return out.masked_fill_(out == big, INVALID)


def selected_mask(idx_BTK: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T, S] bool from top-k indices; -1 slots select nothing (scattered into a spill column)."""
    B, T, _ = idx_BTK.shape
    spill = torch.where(idx_BTK < 0, S, idx_BTK)
    sel = torch.zeros(B, T, S + 1, dtype=torch.bool, device=idx_BTK.device)
    return sel.scatter_(-1, spill, True)[..., :S]


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where `mask`; rows with nothing visible give zeros, not NaN."""
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))


def mla_masked(q_lat_BTHR: torch.Tensor, q_pe_BTHP: torch.Tensor, kv_BSR: torch.Tensor, pe_BSP: torch.Tensor,
               mask_BTS: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA in MQA/absorbed mode over the latent cache, masked dense: O(T*S). Returns o_lat [B, T, H, R].

    q_lat = q_nope @ W_UK (absorbed), so `q_lat . kv + q_pe . pe` equals the per-head MHA logit.
    """
    s_BTHS = (torch.einsum("bthr,bsr->bths", q_lat_BTHR.float(), kv_BSR.float())
              + torch.einsum("bthp,bsp->bths", q_pe_BTHP.float(), pe_BSP.float())) * scale
    p_BTHS = _masked_softmax(s_BTHS, mask_BTS[:, :, None, :])
    return torch.einsum("bths,bsr->bthr", p_BTHS, kv_BSR.float()).to(q_lat_BTHR.dtype)


def sparse_mla_masked(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale):
    """Sparse MLA, reference: dense logits with everything outside the top-k set masked (O(T*S))."""
    mask_BTS = selected_mask(idx_BTK, kv_BSR.shape[1])
    return mla_masked(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, mask_BTS, scale)


def sparse_mla_gathered(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale):
    """Sparse MLA over the gathered latents only (O(T*K)): one key set per query shared by all heads."""
    B, T, K = idx_BTK.shape
    S = kv_BSR.shape[1]
    valid_BTK = idx_BTK >= 0
    # Flat row ids into [B*S]; -1 slots read row 0 and are masked below, never wrapped to the last key.
    rows = (idx_BTK.clamp_min(0) + torch.arange(B, device=idx_BTK.device)[:, None, None] * S).reshape(-1)
    kv_BTKR = kv_BSR.reshape(B * S, -1).index_select(0, rows).view(B, T, K, -1).float()
    pe_BTKP = pe_BSP.reshape(B * S, -1).index_select(0, rows).view(B, T, K, -1).float()
    s_BTHK = (torch.einsum("bthr,btkr->bthk", q_lat_BTHR.float(), kv_BTKR)
              + torch.einsum("bthp,btkp->bthk", q_pe_BTHP.float(), pe_BTKP)) * scale
    p_BTHK = _masked_softmax(s_BTHK, valid_BTK[:, :, None, :])
    return torch.einsum("bthk,btkr->bthr", p_BTHK, kv_BTKR).to(q_lat_BTHR.dtype)


def sdpa_masked(q_BTHD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, mask_BTS: torch.Tensor,
                scale: float) -> torch.Tensor:
    """MHA over the keys a [B, T, S] mask allows, through SDPA; rows it allows nothing give 0 (as the absorbed
    kernels do). Output [B, T, H, v dims] (the value width as given)."""
    o_BHTV = F.scaled_dot_product_attention(q_BTHD.transpose(1, 2), k_BHSD, v_BHSD, attn_mask=mask_BTS[:, None],
                                            scale=scale)
    return o_BHTV.masked_fill(~mask_BTS.any(-1)[:, None, :, None], 0.0).transpose(1, 2)


def masked_mha(q_BTHD, k_BHSD, v_BHSD, idx_BTK, scale, v_dim):
    """V3.2's masked MHA mode: per-head keys and values of a key window [B, H, S, D], each query attending to
    its top-k set only (idx into the window, -1 padded). Output [B, T, H, v_dim] (the first v_dim value dims:
    SDPA's fused kernels want v padded to the qk head dim)."""
    return sdpa_masked(q_BTHD, k_BHSD, v_BHSD, selected_mask(idx_BTK, k_BHSD.shape[2]), scale)[..., :v_dim]
