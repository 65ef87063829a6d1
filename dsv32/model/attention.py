"""Multi-head Latent Attention (DeepSeek-V2/V3) with DeepSeek Sparse Attention (V3.2).

Three ways to compute the same attention, chosen per call:
- **MHA mode** (prefill from position 0, dense): expand the kv latent into per-head keys and values
  and call PyTorch SDPA. The fast path for training and short prefill.
- **Absorbed (MQA) mode, dense** (cached decode / chunked prefill): fold W_UK into the query and W_UV
  into the output, attend over the latent cache directly (`kernels.reference.mla_masked`).
- **Absorbed mode, sparse**: the lightning indexer scores every visible key, each query keeps its
  top-k (one set shared by all heads) and attends over the gathered latents only. When no query has
  more than k visible keys, top-k keeps everything, so the dense path runs instead (bit-identical).
  Where the key window is short, "masked MHA mode" (V3.2's short-prefill mode) runs instead: MHA mode over
  the window with the top-k sets as the mask, exact and cheaper there. Prefill decides per query chunk
  (`MLA._sparse_inference`), training per call (short rows: SFT, RL); `MLA._mha_cheaper` holds the rule.

Legend: B batch, T new tokens, S keys (cache length), H heads, R kv_lora_rank, P rope dims,
N qk_nope dims, V v dims, K selected keys per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels import cpu as kl_ops  # the indexer-KL ops: chunked plain PyTorch, any device
from ..kernels import reference as ref
from . import rope
from .cache import LayerCache
from .config import ModelConfig
from .indexer import Indexer


_INFERENCE_CHUNK_BYTES = 64 << 20  # sparse prefill without autograd: top-k and latents of one query chunk
_MASK_ELEMENTS = 1 << 24  # the largest [B, T, S] top-k mask the one-call masked MHA mode builds (16 MB)
# Measured on CPU (fp32, the tiny and small presets' shapes): per FLOP, the gathered absorbed path runs
# 3.3-4.6x slower than SDPA in forward + backward (the scatter of the latents' gradients) and ~1.2x slower
# in forward alone. The masked-MHA rule counts its FLOPs with these factors (GPU kernels: FLOPs as they are).
_CPU_ABSORBED_COST = {False: 1.2, True: 3.0}  # by grad enabled
# The C masked-MHA kernel (bf16 prefill, `kernels/cpu/mha.py`), per FLOP of 2H(N+P+V) per pair (v unpadded):
# measured 1.9x the absorbed path's rate (~350 against ~190 GFLOP/s on 2 cores): it wins up to ~13K keys.
_CPU_NATIVE_MHA_COST = _CPU_ABSORBED_COST[False] / 1.9


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class AttnContext:
    """What every layer needs to know about the tokens of this forward pass."""

    start: int  # absolute position of the first new token (= tokens already cached; ragged: the largest)
    cos: torch.Tensor  # [B, T, P/2]
    sin: torch.Tensor
    ks: torch.Tensor  # [B, T] first visible key (document start)
    ke: torch.Tensor  # [B, T] one past the last visible key (causal: position + 1)
    sparse: bool  # attention mode of the model
    plain_causal: bool  # no documents and no cached prefix: SDPA's is_causal applies
    max_visible: int  # max over queries of ke - ks (known on the host: no device sync per layer)
    pos: torch.Tensor | None = None  # [B, T] per-row cache positions (ragged batch), else None


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mla
        self.n_heads, self.nope, self.rope_dim, self.v_dim = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_rank, self.topk = m.kv_lora_rank, cfg.indexer.topk
        self.wq_a = nn.Linear(cfg.dim, m.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(m.q_lora_rank)
        self.wq_b = nn.Linear(m.q_lora_rank, m.n_heads * m.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(m.kv_lora_rank)
        self.wkv_b = nn.Linear(m.kv_lora_rank, m.n_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.wo = nn.Linear(m.n_heads * m.v_head_dim, cfg.dim, bias=False)
        self.indexer = Indexer(cfg.dim, m.q_lora_rank, m.qk_rope_head_dim, cfg.indexer)
        # YaRN sharpens the softmax by mscale^2 (DeepSeek-V3; transformers uses mscale_all_dim).
        self.softmax_scale = m.qk_head_dim ** -0.5
        if cfg.rope.scaling == "yarn" and cfg.rope.mscale_all_dim:
            self.softmax_scale *= rope.yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2

    def forward(self, x_BTd: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None,
                topk_out: list | None = None, kl_out: list | None = None) -> torch.Tensor:
        """`topk_out` receives this layer's top-k [B, T, K] (None when dense); `kl_out` its indexer KL."""
        B, T, _ = x_BTd.shape
        H = self.n_heads
        qr_BTq, q_nope_BTHN, q_pe_BTHP, kv_BTR, pe_BTP = self.project(x_BTd, ctx)
        # The indexer reads detached inputs: it learns only from its KL, and the LM loss never reaches
        # it (V3.2 §2.1.1 "we detach the indexer input from the computational graph").
        x_ix, qr_ix = x_BTd.detach(), qr_BTq.detach()
        ik_BTD = ik_scale_BT = None
        if ctx.sparse or cache is not None or kl_out is not None:  # cached even in dense mode
            ik_BTD, ik_scale_BT = self.indexer.keys(x_ix, ctx.cos, ctx.sin)

        if cache is not None:
            kv_BSR, pe_BSP, ik_BSD, ik_scale_BS = cache.write(ctx.start, kv_BTR, pe_BTP, ik_BTD, ik_scale_BT, ctx.pos)
        else:
            kv_BSR, pe_BSP, ik_BSD, ik_scale_BS = kv_BTR, pe_BTP, ik_BTD, ik_scale_BT

        idx_BTK = q_lat_BTHR = iq_BTHD = iw_BTH = None
        if ctx.sparse and ctx.max_visible > self.topk:
            ops = kernels.get(x_BTd.device.type)
            iq_BTHD, iw_BTH = self.indexer.queries(x_ix, qr_ix, ctx.cos, ctx.sin)
            if torch.is_grad_enabled() or topk_out is not None or kl_out is not None:
                with torch.no_grad():
                    idx_BTK = ops.indexer_topk(iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, ctx.ks, ctx.ke, self.topk)
                S = kv_BSR.shape[1]
                if B * T * S <= _MASK_ELEMENTS and self._mha_cheaper(T, S, False, x_BTd.device.type,
                                                                      torch.is_grad_enabled()):
                    # short rows (SFT, RL): masked MHA mode, the [B, T, S] top-k mask in SDPA
                    o_BTHV = self._sdpa(q_nope_BTHN, q_pe_BTHP, *self._mha_keys(kv_BSR, pe_BSP),
                                        ref.selected_mask(idx_BTK, S))
                else:
                    alone = topk_out is None and kl_out is None
                    if alone:  # int32 before the attention's buffers exist (half the [B, T, K] set's memory)
                        idx_BTK = idx_BTK.to(torch.int32)
                    fused = getattr(ops, "sparse_mla_absorbed", None)
                    if fused is not None:  # the absorption inside the kernel's blocks (no [B, T, H, R] stored)
                        o_lat_BTHR = fused(q_nope_BTHN, self._wkv_b_HXR()[:, : self.nope], q_pe_BTHP, kv_BSR, pe_BSP,
                                           idx_BTK, self.softmax_scale)
                    else:
                        q_lat_BTHR = self._absorb_q(q_nope_BTHN)
                        o_lat_BTHR = ops.sparse_mla(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, self.softmax_scale)
                    if alone:
                        idx_BTK = None  # freed now: the kernels keep what their backward needs
                    o_BTHV = self._absorb_out(o_lat_BTHR)
            else:
                o_BTHV = self._sparse_inference(ops, iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, q_nope_BTHN, q_pe_BTHP,
                                                kv_BSR, pe_BSP, ctx)
        elif ctx.start == 0:
            o_BTHV = self._mha(q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP, ctx)
        else:
            o_BTHV = self._absorbed_dense(q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP, ctx)
        if topk_out is not None:
            topk_out.append(idx_BTK)
        if kl_out is not None:
            if cache is not None:
                raise ValueError("the indexer KL is a training loss: call the model without a cache")
            if iq_BTHD is None:  # dense path: the index queries were not needed for selection
                iq_BTHD, iw_BTH = self.indexer.queries(x_ix, qr_ix, ctx.cos, ctx.sin)
            kl_out.append(self._indexer_kl(iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, q_nope_BTHN, q_lat_BTHR, q_pe_BTHP,
                                           kv_BSR, pe_BSP, idx_BTK, ctx))
        return self.wo(o_BTHV.reshape(B, T, H * self.v_dim))

    def project(self, x_BTd: torch.Tensor, ctx: AttnContext):
        """MLA's projections: q latent qr [B, T, q_lora], q_nope [B, T, H, N], roped q_pe [B, T, H, P],
        normed kv latent [B, T, R] and roped shared key pe [B, T, P] (interleaved RoPE on the last dims)."""
        B, T, _ = x_BTd.shape
        qr_BTq = self.q_norm(self.wq_a(x_BTd))
        q_BTHD = self.wq_b(qr_BTq).view(B, T, self.n_heads, self.nope + self.rope_dim)
        q_nope_BTHN, q_pe_BTHP = q_BTHD.split([self.nope, self.rope_dim], dim=-1)
        q_pe_BTHP = rope.apply_interleaved(q_pe_BTHP, ctx.cos, ctx.sin)
        kv_BTR, pe_BTP = self.wkv_a(x_BTd).split([self.kv_rank, self.rope_dim], dim=-1)
        return qr_BTq, q_nope_BTHN, q_pe_BTHP, self.kv_norm(kv_BTR), rope.apply_interleaved(pe_BTP, ctx.cos, ctx.sin)

    def _indexer_kl(self, iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, q_nope_BTHN, q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP,
                    idx_BTK, ctx):
        """The indexer's training loss (dsa-anchors.md §1.9), with every main-model input detached.

        Dense attention (stage 1): mean_t KL(p_t || softmax_{V_t}(I_t)), p_t the head-summed, L1-normalised
        dense attention over the visible keys, computed in blocks with an online log-sum-exp.
        Sparse attention (stage 2): the same over S_t, p-hat_t from the sparse attention's per-head
        probabilities on S_t, O(T*K*H).
        """
        if q_lat_BTHR is None:  # dense path: the absorbed queries were not needed for attention
            with torch.no_grad():
                q_lat_BTHR = self._absorb_q(q_nope_BTHN)
        q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP = q_lat_BTHR.detach(), q_pe_BTHP.detach(), kv_BSR.detach(), pe_BSP.detach()
        if idx_BTK is None:
            return kl_ops.dense_attn_target_kl(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, self.softmax_scale,
                                               iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, ctx.ks, ctx.ke)
        p_BTK = kl_ops.sparse_attn_target(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, self.softmax_scale)
        scores_BTK = kl_ops.indexer_scores_gathered(iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, idx_BTK)
        return kl_ops.indexer_kl_sparse(scores_BTK, p_BTK, idx_BTK)

    # -- the three paths ---------------------------------------------------------------------

    def _mha(self, q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP, ctx: AttnContext) -> torch.Tensor:
        k_BHSD, v_BHSD = self._mha_keys(kv_BSR, pe_BSP)
        mask = None if ctx.plain_causal else ref.valid_mask(ctx.ks, ctx.ke, kv_BSR.shape[1])
        return self._sdpa(q_nope_BTHN, q_pe_BTHP, k_BHSD, v_BHSD, mask)

    def _sparse_inference(self, ops, iq_BTHD, iw_BTH, ik_BSD, ik_scale_BS, q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP,
                          ctx: AttnContext) -> torch.Tensor:
        """Sparse attention without autograd, in chunks of queries: only a chunk's top-k [B, t, K], latent
        queries and outputs [B, t, H, R] exist at a time (at 32K tokens of the `small` preset the whole
        prompt's would be ~1 GB). Each query's result does not depend on the chunking.

        A chunk whose key window is short runs in "masked MHA mode" (V3.2 report: "for short-sequence
        prefilling, we specially implement a masked MHA mode to simulate DSA"): MHA over the window, each
        query over its top-k set (`ops.masked_mha`). A pair costs 2H(N+P) FLOPs per side there against
        2H(2R+P) in absorbed mode (3.4x less at V3's and the `small` preset's proportions), so up to a window
        of about 3k keys the whole window costs less than k gathered latents; with the CPU backend's C kernel
        (bf16), which exponentiates only the selected logits, up to about 6.5k (13K keys at k = 2048, measured
        on 2 cores; `_mha_cheaper`). Rows that see at most k keys keep every
        visible key, so such chunks need no indexer at all. Exact: the same sets, the same softmax.
        """
        B, T, H, _ = q_nope_BTHN.shape
        per_query = B * (2 * H * self.kv_rank * kv_BSR.element_size() + self.topk * 8)
        rows = max(1, _INFERENCE_CHUNK_BYTES // per_query)
        chunks = self._chunk_windows(ctx, T, rows)
        dev = q_nope_BTHN.device.type
        # the windows' latents are expanded once for all MHA chunks: the first pays for its whole window
        # (with a cached prefix, every cached key), each later one for its own new keys
        native = getattr(ops, "masked_mha_native", None)
        fast = native is not None and native(q_nope_BTHN.dtype)
        mha = [self._mha_cheaper(t1 - t0, hi - lo, causal, dev, expand=(hi - lo) if i == 0 else t1 - t0,
                                 native_mha=fast and not all_visible)
               for i, (t0, t1, lo, hi, all_visible, causal) in enumerate(chunks)]
        if any(mha):  # per-head keys and values of the windows that run in MHA mode, expanded once
            a = min(c[2] for c, m in zip(chunks, mha) if m)
            b = max(c[3] for c, m in zip(chunks, mha) if m)
            k_BHWD, v_BHWD = self._mha_keys(kv_BSR[:, a:b], pe_BSP[:, a:b])
        o_BTHV = q_nope_BTHN.new_empty(B, T, H, self.v_dim)
        for (t0, t1, lo, hi, all_visible, causal), use_mha in zip(chunks, mha):
            t = slice(t0, t1)
            idx_BtK = None
            if not (all_visible and use_mha):  # MHA over all-visible rows needs no selection
                idx_BtK = ops.indexer_topk(iq_BTHD[:, t], iw_BTH[:, t], ik_BSD, ik_scale_BS, ctx.ks[:, t],
                                           ctx.ke[:, t], self.topk)
            if use_mha:
                w = slice(lo - a, hi - a)
                if idx_BtK is not None:  # the window's keys, each query over its own set
                    q_BtHD = torch.cat((q_nope_BTHN[:, t], q_pe_BTHP[:, t]), dim=-1)
                    o_BTHV[:, t] = ops.masked_mha(q_BtHD, k_BHWD[:, :, w], v_BHWD[:, :, w],
                                                  torch.where(idx_BtK >= 0, idx_BtK - lo, -1), self.softmax_scale,
                                                  self.v_dim)
                else:  # every visible key is selected; the prompt's first rows: plain causal attention
                    mask = None if causal else ref.valid_mask(ctx.ks[:, t] - lo, ctx.ke[:, t] - lo, hi - lo)
                    o_BTHV[:, t] = self._sdpa(q_nope_BTHN[:, t], q_pe_BTHP[:, t], k_BHWD[:, :, w], v_BHWD[:, :, w],
                                              mask)
            else:
                o_lat_BtHR = ops.sparse_mla(self._absorb_q(q_nope_BTHN[:, t]), q_pe_BTHP[:, t], kv_BSR, pe_BSP,
                                            idx_BtK, self.softmax_scale)
                o_BTHV[:, t] = self._absorb_out(o_lat_BtHR)
        return o_BTHV

    def _chunk_windows(self, ctx: AttnContext, T: int, rows: int) -> list[tuple[int, int, int, int, bool, bool]]:
        """Per query chunk (t0, t1, lo, hi, all_visible, causal): the chunk's key window [lo, hi), whether every
        row sees at most k keys, and whether the chunk is a plain causal square (from key 0, no documents).
        Host integers: from the positions when the prompt is plain causal, else one device read per call."""
        bounds = [(t0, min(T, t0 + rows)) for t0 in range(0, T, rows)]
        if ctx.plain_causal:
            s0 = ctx.start
            return [(t0, t1, 0, s0 + t1, s0 + t1 <= self.topk, s0 + t1 <= self.topk and s0 == 0 and t0 == 0)
                    for t0, t1 in bounds]
        stats = torch.stack([torch.stack((ctx.ks[:, t0:t1].min(), ctx.ke[:, t0:t1].max(),
                                          (ctx.ke[:, t0:t1] - ctx.ks[:, t0:t1]).max())) for t0, t1 in bounds])
        return [(t0, t1, lo, hi, n <= self.topk, False) for (t0, t1), (lo, hi, n) in zip(bounds, stats.tolist())]

    def _mha_cheaper(self, t: int, window: int, causal: bool, device: str = "cpu", backward: bool = False,
                     expand: int | None = None, native_mha: bool = False) -> bool:
        """Masked MHA over the whole window costs less than absorbed attention over k gathered keys: FLOPs,
        the absorbed ones weighted by their measured CPU cost (`_CPU_ABSORBED_COST`).

        `expand` (inference) adds each mode's own projections: MHA mode expands `expand` latents into
        per-head keys and values (W_UK, W_UV), absorbed mode folds the same matrices into the t queries and
        outputs. They cancel in a prompt's chunks (each expands as many keys as it has queries) but not in
        decode, where one query would expand every cached key: decode stays absorbed. Training rows (T = S)
        compare the cores alone. `native_mha`: the chunk runs the CPU backend's C masked-MHA kernel
        (`_CPU_NATIVE_MHA_COST`) instead of SDPA."""
        H, N, P, R, V = self.n_heads, self.nope, self.rope_dim, self.kv_rank, self.v_dim
        if native_mha:
            mha = t * window * 2 * H * (N + P + V) * _CPU_NATIVE_MHA_COST
        else:
            mha = t * window * 2 * H * 2 * (N + P) / (2 if causal else 1)  # v padded to N + P for SDPA's flash
        absorbed = t * min(self.topk, window) * 2 * H * (2 * R + P)
        absorbed *= _CPU_ABSORBED_COST[backward] if device == "cpu" else 1.0
        if expand is not None:
            mha += expand * 2 * R * H * (N + V)
            absorbed += t * 2 * H * R * (N + V)
        return mha < absorbed

    def _mha_keys(self, kv_BWR: torch.Tensor, pe_BWP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B, H, W, N + P] and values [B, H, W, V padded to N + P] of a key window."""
        B, W, _ = kv_BWR.shape
        H, N, V, P = self.n_heads, self.nope, self.v_dim, self.rope_dim
        k_nope_BWHN, v_BWHV = self.wkv_b(kv_BWR).view(B, W, H, N + V).split([N, V], dim=-1)
        k_BHWD = torch.cat((k_nope_BWHN, pe_BWP[:, :, None, :].expand(B, W, H, P)), dim=-1).transpose(1, 2)
        v_BHWD = v_BWHV.transpose(1, 2)
        if V < N + P:  # equal head dims keep SDPA on its fused (flash) kernels
            v_BHWD = F.pad(v_BHWD, (0, N + P - V))
        return k_BHWD, v_BHWD

    def _sdpa(self, q_nope_BTHN, q_pe_BTHP, k_BHSD, v_BHSD, mask_BTS: torch.Tensor | None) -> torch.Tensor:
        """SDPA in MHA mode: causal when `mask` is None, else over the keys the [B, T, S] mask allows (rows it
        allows nothing give 0, as in the absorbed kernels). Output [B, T, H, V]."""
        q_BTHD = torch.cat((q_nope_BTHN, q_pe_BTHP), dim=-1)
        if mask_BTS is not None:
            return ref.sdpa_masked(q_BTHD, k_BHSD, v_BHSD, mask_BTS, self.softmax_scale)[..., :self.v_dim]
        o = F.scaled_dot_product_attention(q_BTHD.transpose(1, 2), k_BHSD, v_BHSD, is_causal=True,
                                           scale=self.softmax_scale)
        return o[..., :self.v_dim].transpose(1, 2)

    def _absorbed_dense(self, q_nope_BTHN, q_pe_BTHP, kv_BSR, pe_BSP, ctx: AttnContext) -> torch.Tensor:
        """Dense attention over the latent cache (decode, chunked prefill): `kernels.reference.mla_masked`
        with the matmuls in the input dtype (bf16 on AMX CPUs and GPUs) and an fp32 softmax."""
        B, T, H, _ = q_nope_BTHN.shape
        S = kv_BSR.shape[1]
        q_lat_BXR = self._absorb_q(q_nope_BTHN).reshape(B, T * H, self.kv_rank)  # X = T*H query rows
        s_BXS = ((q_lat_BXR @ kv_BSR.transpose(1, 2)).float()
                 + (q_pe_BTHP.reshape(B, T * H, self.rope_dim) @ pe_BSP.transpose(1, 2)).float())
        s_BTHS = s_BXS.view(B, T, H, S) * self.softmax_scale
        visible_BT1S = ref.valid_mask(ctx.ks, ctx.ke, S)[:, :, None, :]
        p_BTHS = torch.softmax(s_BTHS.masked_fill(~visible_BT1S, float("-inf")), dim=-1).to(kv_BSR.dtype)
        o_lat_BTHR = (p_BTHS.view(B, T * H, S) @ kv_BSR).view(B, T, H, self.kv_rank)
        return self._absorb_out(o_lat_BTHR)

    # -- weight absorption (DeepSeek-V2 §2.1.2) ----------------------------------------------

    def _wkv_b_HXR(self) -> torch.Tensor:
        return self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)

    def _absorb_q(self, q_nope_BTHN: torch.Tensor) -> torch.Tensor:
        """q_nope . (W_UK c) == (q_nope W_UK) . c: queries in latent space [B, T, H, R]."""
        return torch.einsum("bthn,hnr->bthr", q_nope_BTHN, self._wkv_b_HXR()[:, : self.nope])

    def _absorb_out(self, o_lat_BTHR: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space -> per-head values [B, T, H, V]."""
        return torch.einsum("bthr,hvr->bthv", o_lat_BTHR, self._wkv_b_HXR()[:, self.nope:])
