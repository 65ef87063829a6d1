"""The C part of the CPU backend (`native.c`): built on first use with the system compiler, called via ctypes.

`lib()` returns the loaded library, or None when it cannot be had (no compiler, a failed build, a platform
without POSIX threads, or `DSV32_NATIVE=0`); callers then take their plain-PyTorch path, which computes the
same thing. The shared object is cached under `$DSV32_CACHE` (default `~/.cache/dsv32`), keyed by the
source, the flags and the CPU's feature flags (`-march=native` code runs only where it was built), and is
written to a temporary name first, then renamed, so concurrent first uses never load half a file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-pthread", "-std=c11"]
_lib: ctypes.CDLL | None = None
_tried = False
_off = False  # `disabled()`: the plain-PyTorch twins, for parity tests and comparisons

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "dsv32_index_epilogue": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int],
    "dsv32_topk_rows": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _i64, _int],
    "dsv32_scatter_add_bf16": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
    "dsv32_masked_softmax_bf16": [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _int],
    "dsv32_softmax_bwd_bf16": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
    "dsv32_softmax_fwd_bf16": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _int],
}


def _cpu_id() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("DSV32_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "dsv32")
    return Path(root) / "native"


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"dsv32_native_{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache (a read-only home): this process's temporary directory
        out = Path(tempfile.mkdtemp(prefix="dsv32-native-")) / out.name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{r.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def lib() -> ctypes.CDLL | None:
    """The native library, built and loaded once per process; None if unavailable (see the module doc)."""
    global _lib, _tried
    if _off:
        return None
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("DSV32_NATIVE", "1") == "0" or os.name != "posix":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    try:
        so = ctypes.CDLL(str(_build(cc)))
        for name, args in _SIGNATURES.items():
            fn = getattr(so, name)
            fn.argtypes, fn.restype = args, None
        _lib = so
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"dsv32: the native CPU kernels are unavailable, using plain PyTorch ({e})", stacklevel=2)
    return _lib


def bf16_lib(dtype: torch.dtype) -> ctypes.CDLL | None:
    """`lib()` for a bf16 compute dtype (the attention passes in C are bf16 only), else None."""
    return lib() if dtype == torch.bfloat16 else None


@contextlib.contextmanager
def disabled(off: bool = True):
    """Within the block, `lib()` is None: the CPU kernels take their plain-PyTorch paths."""
    global _off
    before, _off = _off, off
    try:
        yield
    finally:
        _off = before


def threads() -> int:
    return max(1, torch.get_num_threads())
