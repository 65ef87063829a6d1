"""The `triton` kernel backend: DeepSeek Sparse Attention on the GPU (interface in `dsv32.kernels`).

    indexer_topk(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, topk) -> idx_BTK   (int64, -1 padded)
    sparse_mla(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale)  -> o_lat_BTHR (differentiable)
    masked_mha(q_BTHD, k_BHWD, v_BHWD, idx_BTK, scale, v_dim)          -> o_BTHV     (the reference's: SDPA)

`indexer.py`: a Triton kernel for the indexer logits (chunked over queries, only the visible key range),
then the reference's deterministic top-k rule per chunk. `mla.py`: sparse MLA forward (online
softmax over the gathered latents, returns o and lse) and backward (p recomputed from lse, atomic
scatter-add of dkv/dpe), wrapped in an autograd Function.

CUDA tensors run compiled kernels. CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1
set before triton is first imported (slow: for tests at tiny shapes only).
"""

from __future__ import annotations

import triton  # noqa: F401  (absent triton: `kernels.get` treats this backend as missing)

from ..reference import masked_mha
from .indexer import indexer_scores, indexer_topk
from .mla import sparse_mla, sparse_mla_bwd, sparse_mla_fwd

__all__ = ["indexer_scores", "indexer_topk", "masked_mha", "sparse_mla", "sparse_mla_bwd", "sparse_mla_fwd"]
