"""CPU fast path of DeepSeek Sparse Attention: chunked, no L x L tensor (dsa-anchors.md §7.1 items 4-6, §7.3).

Same ops and shapes as `reference.py` (legend there), plus the training helpers of the indexer KL:

    indexer_topk(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, topk) -> idx_BTK
        Scores and top-k block by block over queries: a block scores only its key range
        [min ks, max ke) (causal prefill skips the future), tile by tile over keys, and selects at
        once, so at most O(block * S) scores are alive. fp32 inputs give exactly
        `reference.select_topk(reference.indexer_scores(...))` (same sets, same tie rule; each set in
        ascending index order, `reference.ascending` of the reference's, so it needs no sort);
        bf16 inputs use the bf16 matmul (fp32 accumulation, bf16-rounded logits) and the ReLU-weighted
        head sum in fp32. Long rows are prefiltered exactly (a sampled threshold, checked per row) so
        that only ~1.3 k candidates per row are sorted. NaN scores: order unspecified.
    sparse_mla(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale) -> o_lat_BTHR
        Gathered MQA/absorbed attention as an autograd Function. Forward per query block: `index_select`
        of the kv / pe rows into reused buffers, scores = one [H, R+P] x [R+P, K] product per query
        (batched over the block; the K rows are shared by all H heads), fp32 softmax, o = p x kv. Saves the
        inputs, idx and the log-sum-exp [B, T, H]. Backward recomputes p = exp(s - lse) on the selected
        set only and needs three matmuls per block on g = [kv | pe] rows: [q ; do] g^T (scores and dp
        together), ds g (dq), [p ; ds]^T [do ; q] (dkv | dpe rows, summed into fp32 rows).
        bf16 inputs: bf16 matmuls (scores rounded to bf16), softmax and accumulation in fp32. The
        backward saves the key indices as int32 (idx may be int32 already).
    sparse_mla_absorbed(q_nope_BTHN, w_uk_HNR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale) -> o_lat_BTHR
        The same of q_lat = q_nope W_UK, absorbed block by block: training stores q_nope, not the 4x larger
        latent queries and their gradient.

The per-element work that PyTorch would do in several passes runs in C where a compiler is at hand
(`native.c`, built on first use with `cc -O3 -march=native` and loaded with ctypes; `native.py`): the
indexer's ReLU-weighted head sum and its top-k selection (a radix select over the sampled candidates),
for bf16 sparse attention the softmax, the softmax gradient and the scatter-add of the latents'
gradients, and masked MHA mode's softmax over the selected keys. Each has its plain-PyTorch twin in the same
function, taken when the library is missing or `DSV32_NATIVE=0`; the tests run both. fp32 selections are exactly the reference's either way.

    masked_mha(q_BTHD, k_BHWD, v_BHWD, idx_BTK, scale, v_dim) -> o_BTHV
        V3.2's masked MHA mode for prefill (`mha.py`): per block of queries, bf16 logits over the block's key
        range, a C softmax over each query's selected keys only, p v; no grad. Otherwise the reference's
        SDPA call with the [B, T, S] mask. `masked_mha_native(dtype)` says which one runs.

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

from .indexer import indexer_topk
from .losses import dense_attn_target_kl, indexer_kl_sparse, indexer_scores_gathered, sparse_attn_target
from .mha import masked_mha, masked_mha_native
from .mla import sparse_mla, sparse_mla_absorbed, sparse_mla_lse

__all__ = ["dense_attn_target_kl", "indexer_kl_sparse", "indexer_scores_gathered", "indexer_topk", "masked_mha",
           "masked_mha_native", "sparse_attn_target", "sparse_mla", "sparse_mla_absorbed", "sparse_mla_lse"]
