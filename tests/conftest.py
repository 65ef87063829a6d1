"""Shared helpers: small configs that build in milliseconds and exercise every code path."""

import pytest
import torch

from dsv32.model.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig


def make_config(**overrides) -> ModelConfig:
    """A 3-layer model (1 dense + 2 MoE layers), top-k 8, so 16+ token sequences are sparse."""
    cfg = ModelConfig(
        vocab_size=97, dim=64, inter_dim=96, n_layers=3, max_seq_len=512,
        mla=MLAConfig(n_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=12),
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                      n_limited_groups=2, moe_inter_dim=32, route_scale=1.5, n_dense_layers=1),
        indexer=IndexerConfig(n_heads=4, head_dim=16, topk=8),
    )
    return cfg.replace(**overrides) if overrides else cfg


def scale_weights(model, std: float = 0.3, seed: int = 0):
    """Random weights large enough that attention, the indexer and routing are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if hasattr(m, "bias") and isinstance(m.bias, torch.Tensor) and not isinstance(m.bias, torch.nn.Parameter):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)  # router correction bias
    return model


def successor_model(table: dict[int, int], vocab_size: int, max_seq_len: int = 512):
    """A real Transformer whose greedy next token follows `table` (current token id -> next id): attention and
    MLP outputs are zeroed, so the residual stream is the current token's embedding, and the LM head scores id j
    by the cosine between the current token and j's predecessor in `table`."""
    from dsv32 import Transformer

    model = Transformer(make_config(vocab_size=vocab_size, max_seq_len=max_seq_len))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "ffn.w2")):
                p.zero_()  # attention and MLPs write nothing: the residual stream is the token embedding
        unit = model.embed.weight / model.embed.weight.norm(dim=-1, keepdim=True)
        model.head.weight.zero_()
        for prev, nxt in table.items():
            model.head.weight[nxt] = 10.0 * unit[prev]
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose workers run one each (spawned gloo ranks): the models are tiny,
    and on a busy 2-core machine a second OpenMP thread makes their steps tens of times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
