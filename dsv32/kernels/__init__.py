"""Attention kernels behind one interface, chosen once per device.

Every backend module provides the same three ops (shapes as in `reference.py`):

    indexer_topk(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, topk) -> idx_BTK   (int64, -1 padded)
        The sets are the reference's; the order inside a set is the backend's (reference and triton: by
        score; cpu: by index) - attention does not depend on it; compare with `reference.ascending`.
    sparse_mla(q_lat_BTHR, q_pe_BTHP, kv_BSR, pe_BSP, idx_BTK, scale)  -> o_lat_BTHR (differentiable)
        idx may also be int32 (training hands it so: half the memory of the [B, T, K] set).
    masked_mha(q_BTHD, k_BHWD, v_BHWD, idx_BTK, scale, v_dim)          -> o_BTHV     (inference)
        V3.2's masked MHA mode: MHA over a window of per-head keys, each query over its top-k set only.

Backends: `reference` (plain PyTorch, the ground truth), `cpu` (chunked, no L x L tensor), `triton`
(GPU). Default: triton on CUDA when importable, else cpu when present, else reference. Override with
`dsv32.kernels.use("reference")` or the environment variable `DSV32_KERNELS`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from . import reference

BACKENDS = ("reference", "cpu", "triton")
_override: str | None = None
_loaded: dict[str, ModuleType | None] = {}


class _Reference:
    """The reference ops under the backend interface."""

    @staticmethod
    def indexer_topk(q_BTHD, w_BTH, k_BSD, k_scale_BS, ks_BT, ke_BT, topk):
        return reference.select_topk(reference.indexer_scores(q_BTHD, w_BTH, k_BSD, k_scale_BS), ks_BT, ke_BT, topk)

    sparse_mla = staticmethod(reference.sparse_mla_gathered)
    masked_mha = staticmethod(reference.masked_mha)


def use(name: str | None) -> None:
    """Force a backend for every device (None: back to the default choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    global _override
    _override = name


def _load(name: str):
    if name == "reference":
        return _Reference
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # triton not installed: the backend is absent, not broken
            if e.name not in (f"{__name__}.{name}", "triton"):
                raise
            _loaded[name] = None
    return _loaded[name]


def get(device_type: str):
    """The backend for tensors on `device_type` ("cpu" or "cuda")."""
    name = _override or os.environ.get("DSV32_KERNELS")
    if name:
        if name not in BACKENDS:
            raise ValueError(f"DSV32_KERNELS={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        backend = _load(name)
        if backend is None:
            raise ValueError(f"kernel backend {name!r} is not available here (is triton installed?)")
        return backend
    order = ("triton", "cpu", "reference") if device_type == "cuda" else ("cpu", "reference")
    return next(b for b in map(_load, order) if b is not None)
