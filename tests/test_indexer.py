"""The lightning indexer: Hadamard rotation, FP8 simulation, the exact score formula, fp32 head weights
(dsa-anchors.md §1.3, §1.9, §7.4.6-7, §7.4.14)."""

import math

import pytest
import torch

from conftest import make_config, scale_weights
from dsv32 import Transformer
from dsv32.kernels import reference as ref
from dsv32.model import rope
from dsv32.model.config import IndexerConfig, RopeConfig
from dsv32.model.indexer import FP8_MAX, Indexer, fp8_fake_quant, hadamard_matrix

# -- Hadamard --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 4, 16, 64, 128])
def test_hadamard_is_orthonormal_and_symmetric(d):
    h = hadamard_matrix(d)
    assert h.shape == (d, d) and h.dtype == torch.float32
    torch.testing.assert_close(h @ h.T, torch.eye(d), atol=1e-6, rtol=0)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full((d, d), d ** -0.5))


@pytest.mark.parametrize("d", [0, -4, 3, 6, 48, 100])
def test_hadamard_rejects_non_powers_of_two(d):
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard_matrix(d)


def test_hadamard_config_needs_power_of_two_head_dim():
    with pytest.raises(ValueError, match="indexer.head_dim"):
        IndexerConfig(hadamard=True, head_dim=48)
    IndexerConfig(hadamard=False, head_dim=48)  # fine without the transform
    with pytest.raises(ValueError, match="indexer.head_dim"):
        make_config(**{"indexer.hadamard": True, "indexer.head_dim": 24})


def test_fp8_cache_needs_fp8_quant():
    with pytest.raises(ValueError, match="indexer.cache_fp8"):
        IndexerConfig(cache_fp8=True, quant="none")


def _indexer_inputs(model, B=2, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, model.cfg.dim, generator=g)
    qr = torch.randn(B, T, model.cfg.mla.q_lora_rank, generator=g)
    ctx = model.context(B, T, 0, None, None, x.device)
    return x, qr, ctx


def test_hadamard_preserves_scores_in_fp32():
    plain = scale_weights(Transformer(make_config(**{"indexer.hadamard": False})))
    had = Transformer(make_config(**{"indexer.hadamard": True}))
    had.load_state_dict(plain.state_dict())
    x, qr, ctx = _indexer_inputs(plain)
    with torch.no_grad():
        for layer_p, layer_h in zip(plain.layers, had.layers):
            ip, ih = layer_p.attn.indexer, layer_h.attn.indexer
            kp, _ = ip.keys(x, ctx.cos, ctx.sin)
            kh, _ = ih.keys(x, ctx.cos, ctx.sin)
            qp, wp = ip.queries(x, qr, ctx.cos, ctx.sin)
            qh, wh = ih.queries(x, qr, ctx.cos, ctx.sin)
            assert (qp - qh).abs().max() > 1e-2 and (kp - kh).abs().max() > 1e-2  # the transform ran
            torch.testing.assert_close(kh, kp @ hadamard_matrix(kp.shape[-1]), atol=1e-5, rtol=1e-5)
            sp, sh = ref.indexer_scores(qp, wp, kp), ref.indexer_scores(qh, wh, kh)
            assert sp.abs().max() > 1e-2
            torch.testing.assert_close(sh, sp, atol=1e-5, rtol=1e-5)


# -- FP8 simulation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_round_trip_error(pow2):
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, heavy tails, a zero row and a tiny row.
    x = torch.randn(6, 5, 64, generator=g) * torch.logspace(-3, 3, 6)[:, None, None]
    x[:, :, :4] *= 20
    x[0, 0] = 0.0
    x[0, 1] = 1e-7
    vals, scale = fp8_fake_quant(x, pow2)
    assert scale.shape == x.shape[:-1] and (scale > 0).all()
    assert torch.isfinite(vals).all()
    # Values lie on the e4m3 grid and within its range.
    assert torch.equal(vals.to(torch.float8_e4m3fn).float(), vals)
    assert vals.abs().max() <= FP8_MAX
    # 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= 2^-10 (half the subnormal step) below.
    unit = x / scale[..., None]
    err = (vals - unit).abs()
    bound = torch.maximum(unit.abs() * 2.0 ** -4, torch.full_like(unit, 2.0 ** -10)) * (1 + 1e-6)
    assert (err <= bound).all()
    recon = vals * scale[..., None]
    big = x.abs() > 1e-3 * x.abs().amax(-1, keepdim=True)
    assert ((recon - x).abs()[big] <= x.abs()[big] * 2.0 ** -4 * (1 + 1e-6)).all()
    assert torch.equal(vals[0, 0], torch.zeros(64))
    amax = x.abs().amax(-1).clamp_min(1e-4)
    if pow2:
        e = torch.log2(scale)
        assert torch.equal(e, e.round())  # powers of two
        assert (scale >= amax / FP8_MAX).all() and (scale < 2 * amax / FP8_MAX).all()
    else:
        torch.testing.assert_close(scale, amax / FP8_MAX)
        # The largest element maps to exactly 448 (away from the clamp floor).
        assert torch.equal(vals.abs().amax(-1)[1:], torch.full((5, 5), FP8_MAX))


def test_fp8_gradient_is_straight_through():
    x = torch.randn(4, 3, 32, requires_grad=True)
    vals, scale = fp8_fake_quant(x, pow2=True)
    assert not scale.requires_grad
    (vals * scale[..., None] * torch.arange(32.0)).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.arange(32.0).expand(4, 3, 32), atol=1e-5, rtol=1e-5)


def test_fp8_indexer_backward_reaches_weights():
    model = scale_weights(Transformer(make_config(**{"indexer.quant": "fp8_sim", "indexer.pow2_scales": True})))
    ix = model.layers[0].attn.indexer
    x, qr, ctx = _indexer_inputs(model)
    x.requires_grad_(True)
    k, ks = ix.keys(x, ctx.cos, ctx.sin)
    q, w = ix.queries(x, qr, ctx.cos, ctx.sin)
    ref.indexer_scores(q, w, k, ks).square().mean().backward()
    for p in (ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight, x):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_topk_overlap(pow2):
    T, dim, q_rank, rope_dim, k = 512, 128, 96, 32, 64
    g = torch.Generator().manual_seed(0)
    cfg = dict(n_heads=8, head_dim=64, topk=k)
    exact = Indexer(dim, q_rank, rope_dim, IndexerConfig(**cfg))
    with torch.no_grad():
        for p in exact.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    fp8 = Indexer(dim, q_rank, rope_dim, IndexerConfig(**cfg, quant="fp8_sim", pow2_scales=pow2))
    fp8.load_state_dict(exact.state_dict())
    x, qr = torch.randn(1, T, dim, generator=g), torch.randn(1, T, q_rank, generator=g)
    pos = torch.arange(T)[None]
    cos, sin = rope.cos_sin(rope.inv_freq(RopeConfig(), rope_dim)[0], pos)
    with torch.no_grad():
        ke, _ = exact.keys(x, cos, sin)
        qe, we = exact.queries(x, qr, cos, sin)
        kq, kq_scale = fp8.keys(x, cos, sin)
        qq, wq = fp8.queries(x, qr, cos, sin)
    assert kq_scale.shape == (1, T)
    s_exact = ref.indexer_scores(qe, we, ke)
    s_fp8 = ref.indexer_scores(qq, wq, kq, kq_scale)
    assert not torch.equal(s_exact, s_fp8)  # the quantisation ran
    torch.testing.assert_close(s_fp8, s_exact, atol=0.1 * s_exact.abs().max().item(), rtol=0.1)
    ks = torch.zeros_like(pos)
    a = ref.select_topk(s_exact, ks, pos + 1, k)[0]
    b = ref.select_topk(s_fp8, ks, pos + 1, k)[0]
    overlap = [len(set(a[t].tolist()) & set(b[t].tolist())) / k for t in range(k, T)]  # rows with > k keys
    assert sum(overlap) / len(overlap) >= 0.97
    assert torch.equal(a[:k].sort(-1).values, b[:k].sort(-1).values)  # rows with <= k keys: everything


# -- the score formula ---------------------------------------------------------------------------------


def _brute_scores(q, w, k, k_scale=None):
    B, T, H, D = q.shape
    S = k.shape[1]
    out = torch.zeros(B, T, S, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                acc = 0.0
                for h in range(H):
                    dot = sum(float(q[b, t, h, i]) * float(k[b, s, i]) for i in range(D))
                    acc += float(w[b, t, h]) * max(dot, 0.0)
                out[b, t, s] = acc * (1.0 if k_scale is None else float(k_scale[b, s]))
    return out


@pytest.mark.parametrize("with_scale", [False, True])
def test_indexer_scores_formula(with_scale):
    g = torch.Generator().manual_seed(5)
    B, T, S, H, D = 2, 5, 6, 3, 4
    q, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, S, D, generator=g)
    w = torch.randn(B, T, H, generator=g)  # negative head weights subtract
    k_scale = torch.rand(B, S, generator=g) + 0.5 if with_scale else None
    got = ref.indexer_scores(q, w, k, k_scale, block=2)  # several query blocks
    assert got.dtype == torch.float32 and got.shape == (B, T, S)
    expect = _brute_scores(q, w, k, k_scale)
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)
    assert (got < 0).any() and (got > 0).any()
    torch.testing.assert_close(ref.indexer_scores(q, w, k, k_scale), got, atol=1e-6, rtol=1e-6)


def test_indexer_scores_relu_before_weighting():
    """ReLU per head, then the weighted sum (not ReLU of the sum)."""
    q = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]]])  # [1, 1, 2 heads, 2]
    k = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # [1, 2 keys, 2]
    w = torch.tensor([[[2.0, -3.0]]])
    got = ref.indexer_scores(q, w, k)
    # key 0: head0 dot 1 -> 2*1, head1 dot -1 -> relu 0; key 1: head0 dot -1 -> 0, head1 dot 1 -> -3*1
    assert got.tolist() == [[[2.0, -3.0]]]


def test_weights_proj_stays_fp32_in_bf16_model():
    model = Transformer(make_config()).to(torch.bfloat16)
    for layer in model.layers:
        ix = layer.attn.indexer
        assert ix.weights_proj.weight.dtype == torch.float32
        assert ix.wq_b.weight.dtype == torch.bfloat16 and ix.wk.weight.dtype == torch.bfloat16
    model = Transformer(make_config()).bfloat16()
    assert model.layers[0].attn.indexer.weights_proj.weight.dtype == torch.float32
    x, qr, ctx = _indexer_inputs(model, T=8)
    with torch.no_grad():
        _, w = model.layers[0].attn.indexer.queries(x.bfloat16(), qr.bfloat16(), ctx.cos, ctx.sin)
        assert w.dtype == torch.float32
        logits = model.set_attn_mode("sparse")(torch.randint(0, 97, (1, 24)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_head_weight_scale():
    """w = weights_proj(x) * H^-1/2 * D^-1/2, in fp32."""
    model = scale_weights(Transformer(make_config()))
    ix = model.layers[0].attn.indexer
    x, qr, ctx = _indexer_inputs(model, T=4)
    with torch.no_grad():
        _, w = ix.queries(x, qr, ctx.cos, ctx.sin)
        expect = x @ ix.weights_proj.weight.T / math.sqrt(ix.n_heads * ix.head_dim)
    torch.testing.assert_close(w, expect, atol=1e-5, rtol=1e-5)
