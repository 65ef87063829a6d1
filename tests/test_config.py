"""Config validation, overrides and presets."""

import pytest

from dsv32 import ModelConfig, presets
from dsv32.model.config import IndexerConfig, MoEConfig


def test_unknown_keys_name_the_key_and_suggest():
    with pytest.raises(ValueError, match=r"'indexer\.topkk' \(did you mean 'indexer\.topk'\?\)"):
        ModelConfig.from_dict({"indexer": {"topkk": 4}})
    with pytest.raises(ValueError, match="'dimm'"):
        ModelConfig.from_dict({"dimm": 4})
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        ModelConfig().replace(**{"mla.nope": 3})


def test_hadamard_needs_power_of_two():
    with pytest.raises(ValueError, match="indexer.head_dim.*power of 2"):
        IndexerConfig(head_dim=48, hadamard=True)
    IndexerConfig(head_dim=48, hadamard=False)  # fine without the Hadamard


@pytest.mark.parametrize("kwargs, field", [
    ({"n_routed_experts": 6, "n_expert_groups": 4}, "moe.n_expert_groups"),
    ({"n_activated_experts": 17}, "moe.n_activated_experts"),
    ({"n_routed_experts": 8, "n_expert_groups": 4, "n_limited_groups": 1, "n_activated_experts": 3}, "moe.n_limited_groups"),
])
def test_moe_validation(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        MoEConfig(**kwargs)


def test_model_validation():
    with pytest.raises(ValueError, match="attn_mode"):
        ModelConfig(attn_mode="sparse-ish")
    with pytest.raises(ValueError, match="indexer.head_dim"):
        ModelConfig().replace(**{"indexer.head_dim": 16, "mla.qk_rope_head_dim": 32})
    with pytest.raises(ValueError, match="cache_fp8"):
        IndexerConfig(cache_fp8=True)


def test_round_trip_and_replace():
    cfg = presets.tiny()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    new = cfg.replace(**{"indexer.topk": 16, "dim": 128})
    assert new.indexer.topk == 16 and new.dim == 128 and cfg.indexer.topk == 64


def test_preset_sizes():
    total, active = presets.count_params(presets.tiny())
    assert 2e6 < total < 8e6 and active < total
    total, _ = presets.count_params(presets.small())
    assert 100e6 <= total <= 300e6
    total, active = presets.count_params(presets.v32())
    assert 671e9 < total < 673e9  # 671B main model + 0.85B of indexers (the MTP layer is not part of it)
    assert 36e9 < active < 40e9
    with pytest.raises(ValueError, match="unknown preset"):
        presets.get("huge")
