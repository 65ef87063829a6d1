"""RoPE: both layouts against textbook formulas, which dims MLA and the indexer rotate, YaRN against
transformers, and absolute positions in the cache (dsa-anchors.md §1.4, §7.4.4-5)."""

import math

import pytest
import torch

from conftest import make_config, scale_weights
from dsv32 import Trace, Transformer
from dsv32.model import rope
from dsv32.model.config import IndexerConfig, RopeConfig
from dsv32.model.indexer import Indexer


def _angles(B, T, d, start=0, theta=10000.0):
    freqs, scale = rope.inv_freq(RopeConfig(theta=theta), d)
    pos = (start + torch.arange(T)).expand(B, T)
    cos, sin = rope.cos_sin(freqs, pos, scale)
    return cos, sin, pos[..., None].float() * freqs  # angles [B, T, d/2]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 5, 3, 8), (1, 7, 2, 32)])
def test_half_split_matches_rotate_half(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    B, T, d = shape[0], shape[1], shape[-1]
    cos, sin, _ = _angles(B, T, d, start=3)
    c2, s2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    if x.dim() == 4:
        c2, s2 = c2[:, :, None], s2[:, :, None]
    expect = x * c2 + _rotate_half(x) * s2
    torch.testing.assert_close(rope.apply_half_split(x, cos, sin), expect, atol=1e-6, rtol=1e-6)
    # Power: the other layout is a different rotation.
    assert (rope.apply_interleaved(x, cos, sin) - expect).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 5, 3, 8), (1, 7, 2, 32)])
def test_interleaved_matches_complex_formula(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    B, T, d = shape[0], shape[1], shape[-1]
    cos, sin, ang = _angles(B, T, d, start=5)
    rot = torch.polar(torch.ones_like(ang), ang)  # [B, T, d/2]
    if x.dim() == 4:
        rot = rot[:, :, None]
    expect = torch.view_as_real(torch.view_as_complex(x.reshape(*shape[:-1], d // 2, 2)) * rot).flatten(-2)
    torch.testing.assert_close(rope.apply_interleaved(x, cos, sin), expect, atol=1e-6, rtol=1e-6)
    assert (rope.apply_half_split(x, cos, sin) - expect).abs().max() > 1e-2


def test_rope_keeps_dtype_and_norm():
    x = torch.randn(2, 9, 4, 16).bfloat16()
    cos, sin, _ = _angles(2, 9, 16, start=100)
    for fn in (rope.apply_half_split, rope.apply_interleaved):
        y = fn(x, cos, sin)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), atol=0.1, rtol=1e-2)


def test_position_zero_is_identity():
    x = torch.randn(1, 1, 3, 8)
    cos, sin, _ = _angles(1, 1, 8)
    assert torch.equal(rope.apply_half_split(x, cos, sin), x)
    assert torch.equal(rope.apply_interleaved(x, cos, sin), x)


# -- which dims are rotated: indexer first, MLA last (§7.4.5) ------------------------------------


@pytest.mark.parametrize("layout", ["half_split", "interleaved"])
def test_indexer_rotates_its_first_dims(layout):
    ix = Indexer(dim=8, q_lora_rank=8, rope_dim=4, cfg=IndexerConfig(n_heads=1, head_dim=8, rope_layout=layout))
    x = torch.arange(1.0, 9.0).view(1, 1, 8)  # [1, 2, ..., 8]
    freqs, _ = rope.inv_freq(RopeConfig(), 4)  # [1, 1/100]
    pos = torch.tensor([[3]])
    cos, sin = rope.cos_sin(freqs, pos)
    a0, a1 = 3 * 1.0, 3 * 0.01
    c0, s0, c1, s1 = math.cos(a0), math.sin(a0), math.cos(a1), math.sin(a1)
    if layout == "half_split":  # pairs (0, 2) at angle 0, (1, 3) at angle 1
        head = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 1 * s0 + 3 * c0, 2 * s1 + 4 * c1]
    else:  # pairs (0, 1) at angle 0, (2, 3) at angle 1
        head = [1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1]
    expect = torch.tensor(head + [5.0, 6.0, 7.0, 8.0]).view(1, 1, 8)
    out = ix._rotate(x, cos, sin)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-6)
    assert torch.equal(out[..., 4:], x[..., 4:])  # the tail is untouched


def _naive_mla(attn, x, cos, sin, rope_where: str):
    """Textbook MLA (MHA form, causal) with interleaved RoPE via complex numbers on the q/k rope dims."""
    B, T, _ = x.shape
    H, N, P, V, R = attn.n_heads, attn.nope, attn.rope_dim, attn.v_dim, attn.kv_rank
    ang = torch.atan2(sin, cos)  # [B, T, P/2]
    rot = torch.polar(torch.ones_like(ang), ang)

    def rope_c(v):
        shp = v.shape
        r = rot if v.dim() == 3 else rot[:, :, None]
        return torch.view_as_real(torch.view_as_complex(v.reshape(*shp[:-1], P // 2, 2).contiguous()) * r).flatten(-2)

    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(B, T, H, N + P)
    if rope_where == "last":
        q_nope, q_pe = q[..., :N], rope_c(q[..., N:])
    else:  # the wrong convention, for power
        q_pe, q_nope = rope_c(q[..., :P]), q[..., P:]
    ckv = attn.wkv_a(x)
    kv, k_pe = attn.kv_norm(ckv[..., :R]), rope_c(ckv[..., R:])
    kvb = attn.wkv_b(kv).view(B, T, H, N + V)
    k_nope, v = kvb[..., :N], kvb[..., N:]
    s = torch.einsum("bthn,bshn->bhts", q_nope, k_nope) + torch.einsum("bthp,bsp->bhts", q_pe, k_pe)
    s = s * attn.softmax_scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)
    return attn.wo(o.reshape(B, T, H * V))


def test_mla_rotates_its_last_dims():
    model = scale_weights(Transformer(make_config()))
    attn = model.layers[0].attn
    B, T = 2, 12  # T > topk, but dense mode
    x = torch.randn(B, T, model.cfg.dim, generator=torch.Generator().manual_seed(2))
    ctx = model.context(B, T, 0, None, None, x.device)
    with torch.no_grad():
        out = attn(x, ctx)
        expect = _naive_mla(attn, x, ctx.cos, ctx.sin, "last")
        wrong = _naive_mla(attn, x, ctx.cos, ctx.sin, "first")
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
    assert (out - wrong).abs().max() > 1e-2


def test_indexer_rope_layout_changes_topk():
    """Power for the layout choice: same weights, the other layout selects different keys."""
    a = scale_weights(Transformer(make_config())).set_attn_mode("sparse")
    b = Transformer(make_config(**{"indexer.rope_layout": "interleaved"})).set_attn_mode("sparse")
    b.load_state_dict(a.state_dict())
    assert a.cfg.indexer.rope_layout == "half_split" and b.cfg.indexer.rope_layout == "interleaved"
    x = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(3))
    ta, tb = Trace(), Trace()
    with torch.no_grad():
        la, lb = a(x, trace=ta), b(x, trace=tb)
    ia, ib = ta.topk[0].sort(-1).values, tb.topk[0].sort(-1).values  # layer 0: identical inputs
    differ = (ia != ib).any(-1)
    assert differ.float().mean() > 0.2
    assert not differ[:, :8].any()  # rows with <= k keys take everything either way
    assert (la - lb).abs().max() > 1e-2


# -- YaRN against transformers -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 32, 64])
@pytest.mark.parametrize("params", [
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    dict(factor=4.0, original_max_position_embeddings=2048, beta_fast=16, beta_slow=2, mscale=0.8, mscale_all_dim=1.2),
])
def test_yarn_matches_transformers(dim, params):
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import yarn_apply_mscale

    rope_parameters = dict(rope_type="yarn", rope_theta=10000.0, **params)
    hf = DeepseekV32Config(qk_rope_head_dim=dim, rope_parameters=dict(rope_parameters))
    assert hf.head_dim == dim
    hf_freqs, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")

    rc = RopeConfig(theta=10000.0, scaling="yarn", factor=params["factor"],
                    original_max_position=params["original_max_position_embeddings"],
                    beta_fast=params["beta_fast"], beta_slow=params["beta_slow"],
                    mscale=params["mscale"], mscale_all_dim=params["mscale_all_dim"])
    freqs, factor = rope.inv_freq(rc, dim)
    torch.testing.assert_close(freqs, hf_freqs.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-12)
    plain, _ = rope.inv_freq(RopeConfig(), dim)
    assert not torch.allclose(freqs, plain)  # YaRN really changes the low frequencies
    torch.testing.assert_close(freqs[0], plain[0])  # and keeps the highest one

    # The model wiring: frequencies for the MLA rope dims, the cos/sin factor, and the softmax mscale.
    cfg = make_config(**{"mla.qk_rope_head_dim": dim, "indexer.head_dim": max(dim, 16), "rope.scaling": "yarn",
                         "rope.factor": rc.factor, "rope.original_max_position": rc.original_max_position,
                         "rope.beta_fast": rc.beta_fast, "rope.beta_slow": rc.beta_slow,
                         "rope.mscale": rc.mscale, "rope.mscale_all_dim": rc.mscale_all_dim})
    model = Transformer(cfg)
    torch.testing.assert_close(model._freqs, hf_freqs.float(), atol=0, rtol=1e-6)
    assert model._rope_scale == pytest.approx(hf_factor)
    qk_head_dim = cfg.mla.qk_nope_head_dim + dim
    assert model.layers[0].attn.softmax_scale == pytest.approx(yarn_apply_mscale(rope_parameters, qk_head_dim ** -0.5))


# -- cached index keys carry RoPE at absolute positions (§7.4.4) ---------------------------------


def test_cached_index_keys_are_rotated_at_absolute_positions():
    T, cut = 40, (13, 29)
    model = scale_weights(Transformer(make_config())).set_attn_mode("sparse")
    x = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(4))
    full, chunked = model.new_cache(2, 64), model.new_cache(2, 64)
    with torch.no_grad():
        logits = model(x, cache=full)
        parts = [model(x[:, a:b], cache=chunked) for a, b in zip((0, *cut), (*cut, T))]
    assert full.length == chunked.length == T
    torch.testing.assert_close(torch.cat(parts, 1), logits, atol=1e-4, rtol=1e-4)
    for lf, lc in zip(full.layers, chunked.layers):
        torch.testing.assert_close(lc.index_k[:, :T], lf.index_k[:, :T], atol=1e-5, rtol=1e-5)
        assert lf.index_k[:, T:].abs().max() == 0

    # Layer 0 by hand: Indexer.keys on the normed embeddings at positions 0..T-1.
    attn = model.layers[0].attn
    with torch.no_grad():
        h = model.layers[0].attn_norm(model.embed(x))
        ctx = model.context(2, T, 0, None, None, x.device)
        k, _ = attn.indexer.keys(h, ctx.cos, ctx.sin)
        torch.testing.assert_close(chunked.layers[0].index_k[:, :T], k, atol=1e-6, rtol=1e-6)
        # Power: the last chunk rotated at chunk-relative positions (0..) would not match the cache.
        rel = model.context(2, T - cut[1], 0, None, None, x.device)
        k_rel, _ = attn.indexer.keys(h[:, cut[1]:], rel.cos, rel.sin)
    assert (k_rel - chunked.layers[0].index_k[:, cut[1]:T]).abs().max() > 1e-2
