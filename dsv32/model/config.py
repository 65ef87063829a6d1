"""Model configuration: plain dataclasses, validated on construction.

`ModelConfig` holds the DeepSeek-V3 architecture (MLA + DeepSeekMoE) plus the V3.2 lightning
indexer. Field names follow DeepSeek's reference `inference/model.py` (`ModelArgs`); the mapping to
and from Hugging Face's `DeepseekV32Config` lives in `dsv32/model/hf.py`.

Every mistake a user can make gets a `ValueError` that names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"config field '{name}': {msg}")


@dataclass
class RopeConfig:
    """Rotary embedding. `scaling="yarn"` is DeepSeek-V3's long-context extension (YaRN)."""

    theta: float = 10000.0
    scaling: Literal["none", "yarn"] = "none"
    factor: float = 1.0  # yarn: context extension factor (40 in DeepSeek-V3)
    original_max_position: int = 4096  # yarn: the pre-extension context length
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        _check(self.theta > 0, "rope.theta", f"must be > 0, got {self.theta}")
        _check(self.scaling in ("none", "yarn"), "rope.scaling", f"must be 'none' or 'yarn', got {self.scaling!r}")
        if self.scaling == "yarn":
            _check(self.factor >= 1.0, "rope.factor", f"YaRN needs factor >= 1, got {self.factor}")
            _check(self.original_max_position > 0, "rope.original_max_position", "must be > 0")


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3): low-rank q and kv latents."""

    n_heads: int = 16
    q_lora_rank: int = 384
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64

    def __post_init__(self):
        for name in ("n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _check(getattr(self, name) > 0, f"mla.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim",
               f"must be a positive even number (RoPE rotates pairs), got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class MoEConfig:
    """DeepSeekMoE: shared experts + sigmoid-scored routed experts with group-limited top-k."""

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # experts per token (HF: num_experts_per_tok)
    n_expert_groups: int = 1  # HF: n_group
    n_limited_groups: int = 1  # groups a token may route into (HF: topk_group)
    moe_inter_dim: int = 256
    route_scale: float = 1.0  # HF: routed_scaling_factor
    norm_topk_prob: bool = True
    n_dense_layers: int = 1  # the first layers use a dense MLP (HF: first_k_dense_replace)

    def __post_init__(self):
        _check(self.n_routed_experts > 0, "moe.n_routed_experts", "must be > 0")
        _check(self.n_shared_experts >= 0, "moe.n_shared_experts", "must be >= 0")
        _check(0 < self.n_activated_experts <= self.n_routed_experts, "moe.n_activated_experts",
               f"must be in 1..n_routed_experts={self.n_routed_experts}, got {self.n_activated_experts}")
        _check(self.n_expert_groups > 0 and self.n_routed_experts % self.n_expert_groups == 0, "moe.n_expert_groups",
               f"must divide n_routed_experts={self.n_routed_experts}, got {self.n_expert_groups}")
        _check(0 < self.n_limited_groups <= self.n_expert_groups, "moe.n_limited_groups",
               f"must be in 1..n_expert_groups={self.n_expert_groups}, got {self.n_limited_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        _check(self.n_expert_groups == 1 or per_group >= 2, "moe.n_expert_groups",
               "group scores sum each group's top-2 experts, so every group needs at least 2 experts")
        _check(self.n_limited_groups * per_group >= self.n_activated_experts, "moe.n_limited_groups",
               f"{self.n_limited_groups} groups of {per_group} experts cannot hold {self.n_activated_experts} "
               "activated experts; raise n_limited_groups or lower n_activated_experts")
        _check(self.moe_inter_dim > 0, "moe.moe_inter_dim", "must be > 0")
        _check(self.n_dense_layers >= 0, "moe.n_dense_layers", "must be >= 0")


@dataclass
class IndexerConfig:
    """The V3.2 lightning indexer (dsa-anchors.md §1.2-1.3, §1.9).

    `I[t,s] = sum_h w[t,h] * ReLU(q[t,h] . k[s])`, with `w = weights_proj(x) * H^-1/2 * d^-1/2`.
    RoPE covers the first `qk_rope_head_dim` dims (rope slice first, unlike MLA).
    """

    n_heads: int = 4
    head_dim: int = 64
    topk: int = 2048
    rope_layout: Literal["half_split", "interleaved"] = "half_split"  # DeepSeek (fixed 2025-11-17): half_split
    hadamard: bool = False  # orthonormal Hadamard on q and k before scoring (needs head_dim a power of 2)
    quant: Literal["none", "fp8_sim"] = "none"  # fp8_sim: e4m3 q and k with per-token(-head) scales
    pow2_scales: bool = False  # FP8 scales rounded up to powers of 2 ("ue8m0")
    cache_fp8: bool = False  # store index keys as e4m3 + one fp32 scale per token

    def __post_init__(self):
        _check(self.n_heads > 0, "indexer.n_heads", f"must be > 0, got {self.n_heads}")
        _check(self.head_dim > 0, "indexer.head_dim", f"must be > 0, got {self.head_dim}")
        _check(self.topk > 0, "indexer.topk", f"must be > 0, got {self.topk}")
        _check(self.rope_layout in ("half_split", "interleaved"), "indexer.rope_layout",
               f"must be 'half_split' or 'interleaved', got {self.rope_layout!r}")
        _check(self.quant in ("none", "fp8_sim"), "indexer.quant", f"must be 'none' or 'fp8_sim', got {self.quant!r}")
        _check(not self.cache_fp8 or self.quant == "fp8_sim", "indexer.cache_fp8",
               "an FP8 index-key cache needs indexer.quant='fp8_sim', or cached decoding would select "
               "differently from a full forward; set both or neither")
        if self.hadamard:
            _check(self.head_dim & (self.head_dim - 1) == 0, "indexer.head_dim",
                   f"the Hadamard transform needs a power of 2, got {self.head_dim}; "
                   "use 32, 64 or 128, or set indexer.hadamard=False")


@dataclass
class ModelConfig:
    """The whole model. Presets are in `dsv32/presets.py`."""

    vocab_size: int = 512
    dim: int = 256
    inter_dim: int = 1024  # dense MLP hidden size
    n_layers: int = 4
    norm_eps: float = 1e-6
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_mode: Literal["dense", "sparse"] = "dense"  # the training stages flip this
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    indexer: IndexerConfig = field(default_factory=IndexerConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        for name, cls in (("mla", MLAConfig), ("moe", MoEConfig), ("indexer", IndexerConfig), ("rope", RopeConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, prefix=f"{name}."))
        for name in ("vocab_size", "dim", "inter_dim", "n_layers", "max_seq_len"):
            _check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _check(self.attn_mode in ("dense", "sparse"), "attn_mode", f"must be 'dense' or 'sparse', got {self.attn_mode!r}")
        _check(self.moe.n_dense_layers <= self.n_layers, "moe.n_dense_layers",
               f"cannot exceed n_layers={self.n_layers}, got {self.moe.n_dense_layers}")
        _check(self.indexer.head_dim >= self.mla.qk_rope_head_dim, "indexer.head_dim",
               f"the indexer rotates its first mla.qk_rope_head_dim={self.mla.qk_rope_head_dim} dims, "
               f"so head_dim must be at least that, got {self.indexer.head_dim}")
        _check(self.init_std > 0 and math.isfinite(self.init_std), "init_std", "must be a positive number")

    # -- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a nested dict; unknown keys are errors (with the closest valid names)."""
        return _from_dict(cls, d, prefix="")

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with dotted overrides applied, e.g. `cfg.replace(**{"indexer.topk": 64})`."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            node, *path = dotted.split(".")
            target = d
            keys = [node, *path]
            for key in keys[:-1]:
                if not isinstance(target.get(key), dict):
                    raise ValueError(f"config override '{dotted}': '{key}' is not a section; "
                                     f"sections are mla, moe, indexer, rope")
                target = target[key]
            if keys[-1] not in target:
                raise ValueError(f"config override '{dotted}': unknown key '{keys[-1]}'; "
                                 f"valid keys here: {', '.join(sorted(target))}")
            target[keys[-1]] = value
        return ModelConfig.from_dict(d)


def _from_dict(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or 'model'}' must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}; valid keys in "
                         f"{cls.__name__}: {', '.join(sorted(known))}")
    return cls(**d)
