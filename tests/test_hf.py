"""Checkpoint interop with transformers' DeepseekV32ForCausalLM: same logits both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_config, scale_weights
from dsv32 import Trace, Transformer
from dsv32.model import hf

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=24,
                q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, index_topk=8,
                index_head_dim=32, index_n_heads=16, first_k_dense_replace=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return transformers.DeepseekV32Config(**base)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def random_hf_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    return scale_weights(model, std=0.25, seed=seed)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_hf_to_dsv32_logits(tmp_path, rope):
    config = hf_config(rope_parameters=YARN if rope == "yarn" else hf_config().rope_parameters)
    ref = random_hf_model(config)
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (3, 40))  # T=40 > index_topk=8: sparse attention is active
    model = Transformer.from_pretrained(tmp_path).eval()
    assert model.cfg.attn_mode == "dense"
    trace = Trace()
    with torch.no_grad():
        ours = model.set_attn_mode("sparse")(ids, trace=trace)
    assert all(t is not None and t.shape == (3, 40, 8) for t in trace.topk)  # every layer ran top-k
    assert len(trace.routes) == 3 and trace.routes[0] is None and trace.routes[1].shape == (3, 40, 2)
    theirs = hf_logits(ref, ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Power: the same weights in dense mode are measurably different, so the check above saw sparsity.
    with torch.no_grad():
        dense = model.set_attn_mode("dense")(ids)
    assert (dense - theirs).abs().max().item() > 1e-2


def test_dsv32_to_hf_logits(tmp_path):
    cfg = make_config(**{"indexer.n_heads": 16, "indexer.head_dim": 32, "attn_mode": "sparse"})
    model = scale_weights(Transformer(cfg), std=0.25).eval()
    model.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["architectures"] == ["DeepseekV32ForCausalLM"]
    ref = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        ours = model(ids)
    assert (ours - hf_logits(ref, ids)).abs().max().item() <= 1e-4
    # and back: the dsv32-only settings survive the round trip
    again = Transformer.from_pretrained(tmp_path)
    assert again.cfg == model.cfg


def test_sharded_round_trip(tmp_path):
    model = scale_weights(Transformer(make_config()))
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = Transformer.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bf16_checkpoint_keeps_fp32_islands(tmp_path):
    model = Transformer(make_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    assert loaded.layers[0].attn.indexer.weights_proj.weight.dtype == torch.float32
    assert loaded.layers[1].ffn.gate.weight.dtype == torch.float32


def test_fp8_block_checkpoint_is_dequantised(tmp_path):
    model = scale_weights(Transformer(make_config()))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_b_proj.weight"  # [96, 32]: one partial 128x128 block
    w = tensors[name]
    scale = w.abs().amax().clamp_min(1e-4) / 448.0
    tensors[name] = (w / scale).to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = scale.reshape(1, 1).float()
    tensors["model.layers.3.mlp.gate.weight"] = torch.zeros(8, 64)  # an MTP layer beyond n_layers: ignored
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = Transformer.from_pretrained(tmp_path)
    got = loaded.layers[0].attn.wq_b.weight
    assert not torch.equal(got, model.layers[0].attn.wq_b.weight)  # it really went through FP8
    assert torch.allclose(got, model.layers[0].attn.wq_b.weight, rtol=0.07, atol=scale.item())


def test_dequant_block_fp8_uses_one_scale_per_block():
    w = torch.ones(130, 260).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = hf.dequant_block_fp8(w, scale)
    assert out[0, 0] == 1 and out[0, 128] == 2 and out[0, 259] == 3 and out[129, 0] == 4 and out[129, 259] == 6


def test_config_mapping_round_trip():
    from dsv32 import presets

    for name in presets.PRESETS:
        cfg = presets.get(name)
        assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    # the v32 preset is DeepSeek's published config
    published = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                 "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
                 "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                 "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
                 "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 163840,
                 "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64}
    got = hf.config_to_hf(presets.v32())
    assert {k: got[k] for k in published} == published
    assert got["rope_parameters"]["factor"] == 40.0 and got["rope_parameters"]["original_max_position_embeddings"] == 4096
    # transformers accepts what we write
    transformers.DeepseekV32Config(**{k: v for k, v in got.items() if k not in ("architectures", "model_type")})


# -- bad checkpoints: a ValueError that names the problem ---------------------------------------

def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    Transformer(make_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_missing_shard(tmp_path):
    Transformer(make_config()).save_pretrained(tmp_path, max_shard_bytes=100_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        Transformer.from_pretrained(tmp_path)


def test_missing_tensor(tmp_path):
    Transformer(make_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.indexer.wk.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="indexer.wk.weight.*missing"):
        Transformer.from_pretrained(tmp_path)


def test_mismatched_shapes(tmp_path):
    Transformer(make_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["index_head_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"indexer\.wq_b\.weight.*shape"):
        Transformer.from_pretrained(tmp_path)


def test_bad_config_json(tmp_path):
    Transformer(make_config()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 97,\n "hidden_size": }')
    with pytest.raises(ValueError, match="line 2"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 97, "hidden_sise": 64}))
    with pytest.raises(ValueError, match="hidden_sise"):
        Transformer.from_pretrained(tmp_path)


def test_unsupported_config_values():
    good = hf.config_to_hf(make_config())
    for key, value, match in (("hidden_act", "gelu", "hidden_act"), ("num_key_value_heads", 1, "num_key_value_heads"),
                              ("q_lora_rank", None, "q_lora_rank")):
        with pytest.raises(ValueError, match=match):
            hf.config_from_hf({**good, key: value})
    with pytest.raises(ValueError, match="dsv32.bogus"):
        hf.config_from_hf({**good, "dsv32": {"bogus": 1}})
