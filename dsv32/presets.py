"""Model presets as plain functions (gpt-fast style). `dsv32 presets` prints their sizes.

- `tiny`:  ~4M parameters, trains on a 2-core CPU; top-k 64 so 128+-token sequences are sparse.
- `small`: ~260M parameters (about 60M active per token), one GPU; the shapes `dsv32 bench` uses.
- `v32`:   DeepSeek-V3.2 as published (inference/config_671B_v3.2.json + the HF config.json), 671B.
"""

from __future__ import annotations

from .model.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig


def tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, dim=256, inter_dim=768, n_layers=4, max_seq_len=4096,
        mla=MLAConfig(n_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                      n_limited_groups=1, moe_inter_dim=128, route_scale=1.0, n_dense_layers=1),
        indexer=IndexerConfig(n_heads=4, head_dim=32, topk=64, hadamard=True),
    )


def small() -> ModelConfig:
    return ModelConfig(
        vocab_size=32768, dim=1024, inter_dim=2816, n_layers=12, max_seq_len=131072,
        mla=MLAConfig(n_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
        moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                      n_limited_groups=2, moe_inter_dim=256, route_scale=1.0, n_dense_layers=1),
        indexer=IndexerConfig(n_heads=4, head_dim=64, topk=2048, hadamard=True),
    )


def v32() -> ModelConfig:
    """DeepSeek-V3.2 (and V3.2-Exp): same architecture, 671B total / 37B active parameters."""
    return ModelConfig(
        vocab_size=129280, dim=7168, inter_dim=18432, n_layers=61, max_seq_len=163840, norm_eps=1e-6,
        init_std=0.006, attn_mode="sparse", bos_token_id=0, eos_token_id=1,
        mla=MLAConfig(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128),
        moe=MoEConfig(n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                      n_limited_groups=4, moe_inter_dim=2048, route_scale=2.5, norm_topk_prob=True, n_dense_layers=3),
        # DeepSeek's inference demo: Hadamard + FP8 e4m3 with ue8m0 (power-of-2) scales, FP8 index-key cache.
        indexer=IndexerConfig(n_heads=64, head_dim=128, topk=2048, rope_layout="half_split", hadamard=True,
                              quant="fp8_sim", pow2_scales=True, cache_fp8=True),
        rope=RopeConfig(theta=10000.0, scaling="yarn", factor=40.0, original_max_position=4096, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    )


PRESETS = {"tiny": tiny, "small": small, "v32": v32}


def get(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters, counted on the meta device (no memory used)."""
    import torch

    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.num_params()
    moe = cfg.moe
    n_moe_layers = cfg.n_layers - moe.n_dense_layers
    inactive = n_moe_layers * (moe.n_routed_experts - moe.n_activated_experts) * 3 * cfg.dim * moe.moe_inter_dim
    return total, total - inactive
