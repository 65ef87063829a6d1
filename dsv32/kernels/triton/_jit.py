"""Launch helpers: kernels compiled for the GPU, or run by Triton's interpreter (numpy, CPU tensors).

The interpreter works only when TRITON_INTERPRET=1 was set before `import triton`: triton.language's own
helpers (tl.zeros, tl.max, tl.sum, ...) are `@triton.jit` functions, built as interpreted or compiled
functions once, when triton is imported. So our kernels follow the mode triton itself was imported in
(`INTERPRETED`), and CPU tensors outside that mode get a clear error instead of a crash deep in triton.

Loop bounds in the kernels are constexpr (the indexer's head count H, sparse MLA's top-k width K): triton
3.6's interpreter cannot take `range()` of a runtime scalar with numpy >= 2.4 (fixed in later triton).
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


INTERPRETED = _interpreted()  # triton was imported with TRITON_INTERPRET=1


def interpreting(device: torch.device) -> bool:
    if INTERPRETED:
        return True
    if device.type == "cpu":
        raise RuntimeError("the triton kernel backend runs on CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported (or use the cpu/reference backend)")
    return False


def jit(fn):
    """`triton.jit` in the mode triton was imported in (for helpers called from kernels)."""
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return JITFunction(fn)


class Kernel:
    """A Triton kernel; `kernel.on(device)[grid](*args)` launches it, with a clear error for CPU tensors
    when triton is not in interpreter mode."""

    def __init__(self, fn):
        self.fn = jit(fn)
        self.__name__ = fn.__name__

    def on(self, device: torch.device):
        interpreting(device)
        return self.fn


def kernel(fn) -> Kernel:
    return Kernel(fn)


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 operands as raw uint16 bits (triton 3.9): kernels cast them to fp32
    before tl.dot there (exact: bf16 products fit fp32). Compiled kernels use bf16 tensor cores."""
    return INTERPRETED and dtype == torch.bfloat16


@jit
def mm(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot(a, b, acc) with the interpreter's bf16 workaround."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PREC)


def device_guard(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full-precision dots (parity with the fp32 reference; TF32 would cost ~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, lo: int = 16) -> int:
    """Block size covering n: a power of 2, at least `lo` (tl.dot needs every dim >= 16)."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())
