"""Tensors that stay fp32 when the rest of the model is cast (DeepSeek and transformers keep the
indexer's `weights_proj` and the router's weight and correction bias in fp32)."""

from __future__ import annotations

import torch
import torch.nn as nn


class KeepFP32(nn.Module):
    """Base for modules whose `_fp32` tensors (dotted names) keep their fp32 *values* through
    `model.to(dtype)` / `.bfloat16()`: the cast is undone from the saved original, not re-widened
    from the rounded copy. Device moves apply as usual."""

    _fp32: tuple[str, ...] = ()

    def _tensor(self, dotted: str) -> torch.Tensor:
        owner, _, name = dotted.rpartition(".")
        return getattr(self.get_submodule(owner) if owner else self, name)

    def _apply(self, fn, recurse=True):
        saved = {name: self._tensor(name).data for name in self._fp32}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            t = self._tensor(name)
            if t.dtype != torch.float32:
                t.data = t.data.float() if (old.is_meta or t.is_meta) else old.to(t.device, torch.float32)
        return self
