"""Hugging Face checkpoint format: `DeepseekV32ForCausalLM` (config.json + safetensors).

What transformers writes and what DeepSeek publishes on the hub share one layout: per-expert weights
(`mlp.experts.{e}.gate_proj.weight`), the indexer under `self_attn.indexer.*`, optional sharding with
`model.safetensors.index.json`, and (DeepSeek's release) block-FP8 weights with a
`weight_scale_inv` per 128x128 block, which are dequantised on load. The multi-token-prediction
layer (`model.layers.{n_layers}`) is skipped. dsv32-only settings (indexer RoPE layout, Hadamard,
FP8 simulation, attention mode) travel in a `dsv32` entry of config.json, which transformers keeps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_write, write_json
from .config import ModelConfig

# -- config ---------------------------------------------------------------------------------------

_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "initializer_range",
    "attention_dropout", "output_router_logits", "pad_token_id", "head_dim", "qk_head_dim", "layer_types",
    "num_nextn_predict_layers", "ep_size", "auto_map", "quantization_config", "aux_loss_alpha", "seq_aux",
    "pretraining_tp", "rope_interleave", "mlp_bias", "num_key_value_heads", "max_window_layers", "return_dict",
    "output_hidden_states", "output_attentions", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "bos_token_id", "eos_token_id", "moe_layer_freq", "first_k_dense_replace",
    "mlp_layer_types", "rope_parameters", "rope_scaling", "rope_theta", "scoring_func", "topk_method", "hidden_act",
    "attention_bias", "tie_word_embeddings", "dsv32", "_name_or_path",
}

_HF_FIELDS = {  # HF name -> (section, dsv32 name)
    "vocab_size": (None, "vocab_size"), "hidden_size": (None, "dim"), "intermediate_size": (None, "inter_dim"),
    "num_hidden_layers": (None, "n_layers"), "rms_norm_eps": (None, "norm_eps"),
    "max_position_embeddings": (None, "max_seq_len"),
    "num_attention_heads": ("mla", "n_heads"), "q_lora_rank": ("mla", "q_lora_rank"),
    "kv_lora_rank": ("mla", "kv_lora_rank"), "qk_nope_head_dim": ("mla", "qk_nope_head_dim"),
    "qk_rope_head_dim": ("mla", "qk_rope_head_dim"), "v_head_dim": ("mla", "v_head_dim"),
    "n_routed_experts": ("moe", "n_routed_experts"), "n_shared_experts": ("moe", "n_shared_experts"),
    "num_experts_per_tok": ("moe", "n_activated_experts"), "n_group": ("moe", "n_expert_groups"),
    "topk_group": ("moe", "n_limited_groups"), "moe_intermediate_size": ("moe", "moe_inter_dim"),
    "routed_scaling_factor": ("moe", "route_scale"), "norm_topk_prob": ("moe", "norm_topk_prob"),
    "index_n_heads": ("indexer", "n_heads"), "index_head_dim": ("indexer", "head_dim"),
    "index_topk": ("indexer", "topk"),
}


def _unsupported(name: str, value, why: str):
    raise ValueError(f"config.json field '{name}'={value!r} is not supported: {why}")


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a `DeepseekV32Config` dict (config.json)."""
    unknown = sorted(set(hf) - set(_HF_FIELDS) - _IGNORED_HF_KEYS)
    if unknown:
        raise ValueError(f"config.json has fields dsv32 does not know: {', '.join(unknown)}; "
                         "is this a DeepseekV32ForCausalLM checkpoint?")
    if hf.get("model_type", "deepseek_v32") != "deepseek_v32":
        _unsupported("model_type", hf["model_type"], "dsv32 reads DeepSeek-V3.2 ('deepseek_v32') checkpoints")
    if hf.get("q_lora_rank") is None:
        _unsupported("q_lora_rank", None, "the lightning indexer reads MLA's q latent, so q_lora_rank must be set")
    for name, expected in (("hidden_act", "silu"), ("attention_bias", False), ("scoring_func", "sigmoid"),
                           ("moe_layer_freq", 1), ("topk_method", "noaux_tc")):
        if name in hf and hf[name] != expected:
            _unsupported(name, hf[name], f"DeepSeek-V3.2 uses {expected!r}")
    n_kv = hf.get("num_key_value_heads")
    if n_kv is not None and n_kv != hf.get("num_attention_heads"):
        _unsupported("num_key_value_heads", n_kv, "MLA has as many key/value heads as query heads")

    d: dict = {"mla": {}, "moe": {}, "indexer": {}, "rope": {}}
    for hf_name, (section, name) in _HF_FIELDS.items():
        if hf_name in hf:
            (d if section is None else d[section])[name] = hf[hf_name]
    n_dense = hf.get("first_k_dense_replace", 3)
    layer_types = hf.get("mlp_layer_types")
    if layer_types is not None:
        n_dense = sum(t == "dense" for t in layer_types)
        if layer_types != ["dense"] * n_dense + ["sparse"] * (len(layer_types) - n_dense):
            _unsupported("mlp_layer_types", layer_types, "dense layers must come first, then MoE layers")
    d["moe"]["n_dense_layers"] = n_dense
    d["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    d["bos_token_id"], d["eos_token_id"] = hf.get("bos_token_id"), hf.get("eos_token_id")
    if isinstance(d["eos_token_id"], list):
        d["eos_token_id"] = d["eos_token_id"][0]
    if "initializer_range" in hf:
        d["init_std"] = hf["initializer_range"]
    d["rope"] = _rope_from_hf(hf)
    extra = hf.get("dsv32", {})
    for key, value in extra.items():
        if key in ("attn_mode", "init_std"):
            d[key] = value
        elif key in ("rope_layout", "hadamard", "quant", "pow2_scales", "cache_fp8"):
            d["indexer"][key] = value
        else:
            raise ValueError(f"config.json field 'dsv32.{key}' is unknown; valid: attn_mode, init_std, "
                             "rope_layout, hadamard, quant, pow2_scales, cache_fp8")
    return ModelConfig.from_dict(d)


def _rope_from_hf(hf: dict) -> dict:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type == "default":
        return {"theta": theta}
    if rope_type != "yarn":
        _unsupported("rope_parameters.rope_type", rope_type, "only 'default' and 'yarn' (DeepSeek-V3) are implemented")
    if params.get("attention_factor") is not None:
        _unsupported("rope_parameters.attention_factor", params["attention_factor"], "set mscale/mscale_all_dim instead")
    return {"theta": theta, "scaling": "yarn", "factor": params["factor"],
            "original_max_position": params["original_max_position_embeddings"],
            "beta_fast": params.get("beta_fast") or 32.0, "beta_slow": params.get("beta_slow") or 1.0,
            "mscale": params.get("mscale") or 0.0, "mscale_all_dim": params.get("mscale_all_dim") or 0.0}


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json contents for `transformers.DeepseekV32Config`."""
    hf: dict = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
    for hf_name, (section, name) in _HF_FIELDS.items():
        hf[hf_name] = getattr(cfg if section is None else getattr(cfg, section), name)
    hf.update(num_key_value_heads=cfg.mla.n_heads, first_k_dense_replace=cfg.moe.n_dense_layers,
              hidden_act="silu", attention_bias=False, tie_word_embeddings=cfg.tie_embeddings,
              bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, initializer_range=cfg.init_std)
    r = cfg.rope
    if r.scaling == "yarn":
        hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": r.theta, "factor": r.factor,
                                 "original_max_position_embeddings": r.original_max_position,
                                 "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                                 "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim}
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": r.theta}
    ix = cfg.indexer
    hf["dsv32"] = {"attn_mode": cfg.attn_mode, "rope_layout": ix.rope_layout, "hadamard": ix.hadamard,
                   "quant": ix.quant, "pow2_scales": ix.pow2_scales, "cache_fp8": ix.cache_fp8}
    return hf


# -- weight names ---------------------------------------------------------------------------------

_ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
         "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _hf_name(name: str) -> str:
    """dsv32 parameter name -> HF name (stacked experts are handled by the callers)."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    i, rest = m.group(1), m.group(2)
    rest = rest.replace("attn_norm.", "input_layernorm.").replace("ffn_norm.", "post_attention_layernorm.")
    rest = re.sub(r"^attn\.(\w+)\.", lambda g: f"self_attn.{_ATTN.get(g.group(1), g.group(1))}.", rest)
    rest = rest.replace("ffn.gate.bias", "ffn.gate.e_score_correction_bias").replace("ffn.shared.", "ffn.shared_experts.")
    rest = re.sub(r"\.(w[123])\.", lambda g: f".{_MLP[g.group(1)]}.", rest)
    return f"model.layers.{i}.{rest.replace('ffn.', 'mlp.')}"


def _is_stacked(name: str) -> bool:
    return re.fullmatch(r"layers\.\d+\.ffn\.w[123]", name) is not None


def _expert_names(name: str, n_experts: int) -> list[str]:
    i, w = re.fullmatch(r"layers\.(\d+)\.ffn\.(w[123])", name).groups()
    return [f"model.layers.{i}.mlp.experts.{e}.{_MLP[w]}.weight" for e in range(n_experts)]


# -- loading --------------------------------------------------------------------------------------

class _TensorSource:
    """Reads tensors by name from one or several safetensors files; dequantises block-FP8 weights."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                             "point at a directory written by save_pretrained or downloaded from the hub")
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise ValueError(f"{path}: the index lists shard(s) that are not there: {', '.join(missing)}; "
                             "the download is incomplete")
        self.path, self.weight_map, self._open = path, weight_map, {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.path / file, "pt")
        t = self._open[file].get_tensor(name)
        if t.dtype == torch.float8_e4m3fn and f"{name}_scale_inv" in self.weight_map:
            t = dequant_block_fp8(t, self.get(f"{name}_scale_inv"))
        return t


def dequant_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek's FP8 weights: one fp32 scale per [block x block] tile; returns fp32."""
    out, inp = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return w.float() * s


def load_pretrained(path, dtype=None, device="cpu", **overrides):
    from .transformer import Transformer

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path}: no config.json; expected a Hugging Face DeepseekV32ForCausalLM directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON (line {e.lineno}): {e.msg}") from None
    cfg = config_from_hf(hf)
    if overrides:
        cfg = cfg.replace(**overrides)
    src = _TensorSource(path)
    if dtype is None:
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)

    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if cfg.tie_embeddings and name == "head.weight":
            continue
        if _is_stacked(name):
            keys = _expert_names(name, cfg.moe.n_routed_experts)
            for k in keys:
                _require(src, k, path)
            t = torch.stack([src.get(k) for k in keys])
        else:
            key = _hf_name(name)
            _require(src, key, path)
            t = src.get(key)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor '{key if not _is_stacked(name) else keys[0]}' has shape "
                             f"{tuple(t.shape)}, the config implies {tuple(p.shape)}; config.json and the weights disagree")
        keep_fp32 = name.endswith(("weights_proj.weight", "gate.weight", "gate.bias"))
        state[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.to(device)


def _require(src: _TensorSource, key: str, path: Path):
    if key not in src:
        raise ValueError(f"{path}: tensor '{key}' is missing from the checkpoint; the files are incomplete "
                         "or were written for a different config")


# -- saving ---------------------------------------------------------------------------------------

def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, experts split per expert, contiguous and untied."""
    out = {}
    for name, t in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "head.weight":
            continue
        if _is_stacked(name):
            for e, key in enumerate(_expert_names(name, t.shape[0])):
                out[key] = t[e].contiguous()
        else:
            out[_hf_name(name)] = t.contiguous()
    return out


def save_pretrained(model, path, max_shard_bytes: int = 5 * 2**30) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    stale = path / ("model.safetensors" if len(shards) > 1 else "model.safetensors.index.json")
    stale.unlink(missing_ok=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        write_json(path / "model.safetensors.index.json", index)
    hf = config_to_hf(model.cfg)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf["dtype"] = hf["torch_dtype"] = dtype
    write_json(path / "config.json", hf)
