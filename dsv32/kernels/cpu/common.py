"""Shared by the CPU kernels: block sizing from a byte budget and the compute dtype."""

from __future__ import annotations


import torch

from .. import reference as ref

INVALID = ref.INVALID
BLOCK_BYTES = 32 << 20  # working set per block (scores, gathered latents, ...)
_I64_MIN = torch.iinfo(torch.int64).min
_LOW32 = 0xFFFFFFFF


def _rows_for(per_row_bytes: int, n: int, cap: int = 1024, budget: int | None = None) -> int:
    """Rows per block so that a block's working set stays within `budget` (default BLOCK_BYTES)."""
    return max(1, min(n, cap, (budget or BLOCK_BYTES) // max(1, per_row_bytes)))


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
