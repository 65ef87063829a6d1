"""The CPU DSA backend (dsv32/kernels/cpu.py) against the reference ops.

indexer_topk: exact sets and order in fp32 (tie rule included), >= 98% overlap in bf16. sparse_mla:
forward and all four gradients to 1e-5, with -1 slots and all-invalid rows. The indexer-KL helpers
against brute-force dense computations. No tensor of T*S/4 elements at T = S = 4096. The model gives
the same logits and gradients with the cpu and the reference backend.
"""

import math
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dsv32.kernels as kernels
from conftest import make_config, scale_weights
from dsv32 import Trace, Transformer
from dsv32.kernels import cpu
from dsv32.kernels.cpu import common as cpu_common
from dsv32.kernels.cpu import indexer as cpu_indexer
from dsv32.kernels.cpu import mla as cpu_mla
from dsv32.kernels.cpu import native
from dsv32.kernels import reference as ref


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _index_inputs(B, T, S, H, D, seed=0, scale=False, dtype=torch.float32):
    g = _gen(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    w = torch.randn(B, T, H, generator=g) * (H * D) ** -0.5
    k = torch.randn(B, S, D, generator=g).to(dtype)
    ksc = torch.rand(B, S, generator=g) + 0.5 if scale else None
    return q, w, k, ksc


def _causal(B, T, S):
    """ks/ke of T new tokens at the end of an S-token sequence (chunked prefill when T < S)."""
    ke = torch.arange(S - T + 1, S + 1).expand(B, T).contiguous()
    return torch.zeros(B, T, dtype=torch.long), ke


def _ref_topk(q, w, k, ksc, ks, ke, topk):
    """The reference's sets in the cpu backend's order (ascending index, -1 last)."""
    return ref.ascending(ref.select_topk(ref.indexer_scores(q, w, k, ksc), ks, ke, topk))


# -- indexer_topk ------------------------------------------------------------------------------


@pytest.fixture(params=["native", "torch"])
def impl(request):
    """The indexer tests run on both CPU paths: the C kernels (native.c) and their plain-PyTorch twins."""
    if request.param == "torch":
        with native.disabled():
            yield request.param
    else:
        if native.lib() is None:
            pytest.skip("the native CPU kernels are not built here (no C compiler)")
        yield request.param


def test_native_builds_where_a_compiler_is():
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.lib() is not None


@pytest.mark.parametrize("B,T,S,H,D,topk,scale", [
    (1, 16, 16, 4, 16, 32, False),     # S < k
    (2, 24, 24, 4, 16, 24, True),      # S == k
    (2, 96, 700, 4, 16, 32, False),    # S >> k, batch > 1
    (1, 40, 300, 16, 32, 64, True),    # more heads, k_scale
    (3, 1, 2000, 4, 16, 64, False),    # decode: one query, long cache
])
def test_indexer_topk_causal_exact(B, T, S, H, D, topk, scale, impl):
    q, w, k, ksc = _index_inputs(B, T, S, H, D, scale=scale)
    ks, ke = _causal(B, T, S)
    assert torch.equal(cpu.indexer_topk(q, w, k, ksc, ks, ke, topk), _ref_topk(q, w, k, ksc, ks, ke, topk))


def test_indexer_topk_documents_exact(impl):
    """Packed documents (ks > 0), empty ranges, ranges past S, non-uniform blocks."""
    B, T, S, H, D, topk = 2, 120, 400, 4, 16, 24
    q, w, k, ksc = _index_inputs(B, T, S, H, D, seed=1, scale=True)
    g = _gen(1)
    ks = torch.randint(0, 300, (B, T), generator=g)
    ke = ks + torch.randint(0, 150, (B, T), generator=g)  # some empty, some past S
    ks[0, :5] = 350
    ke[0, :5] = 340  # ke < ks: nothing visible
    assert torch.equal(cpu.indexer_topk(q, w, k, ksc, ks, ke, topk), _ref_topk(q, w, k, ksc, ks, ke, topk))


def test_indexer_topk_decode_reads_cache_slice(impl):
    """Decode against a long cache with documents: ks/ke of the last position only."""
    B, S, H, D, topk = 2, 3000, 4, 32, 128
    q, w, k, _ = _index_inputs(B, 1, S, H, D, seed=2)
    ks = torch.tensor([[0], [1700]])
    ke = torch.tensor([[S], [2999]])
    assert torch.equal(cpu.indexer_topk(q, w, k, None, ks, ke, topk), _ref_topk(q, w, k, None, ks, ke, topk))


def test_indexer_topk_ties_exact(impl):
    """Many exact-zero scores (every ReLU is 0): ties go to the lowest index, like the reference."""
    B, T, S, H, D, topk = 2, 64, 500, 4, 16, 48
    q, w, k, _ = _index_inputs(B, T, S, H, D, seed=3)
    q[:, ::2] = -q[:, ::2].abs()
    k = k.abs()  # even rows: all logits <= 0, so every score is exactly 0 (or -0.0 where w < 0)
    k[:, 100:110] = -k[:, 100:110]  # odd rows: a few positive logits among the zeros
    q[:, 1::2] = -q[:, 1::2].abs()
    ks, ke = _causal(B, T, S)
    out = cpu.indexer_topk(q, w, k, None, ks, ke, topk)
    assert torch.equal(out, _ref_topk(q, w, k, None, ks, ke, topk))
    assert torch.equal(out[:, 0, :topk], torch.arange(topk).expand(B, topk))  # the plateau: lowest indices


@pytest.mark.parametrize("hits", [2, 8])
def test_indexer_topk_prefilter_exact(monkeypatch, hits, impl):
    """Long rows take the sampled-threshold prefilter (forced at small k here), exactly like the reference."""
    monkeypatch.setattr(cpu_indexer, "_SAMPLE_HITS", hits)
    B, T, S, H, D, topk = 2, 80, 3000, 4, 16, 64
    q, w, k, ksc = _index_inputs(B, T, S, H, D, seed=4, scale=True)
    ks, ke = _causal(B, T, S)
    ks[1, 40:] = 900  # a document boundary inside the block
    assert torch.equal(cpu.indexer_topk(q, w, k, ksc, ks, ke, topk), _ref_topk(q, w, k, ksc, ks, ke, topk))


def test_topk_block_adversarial_scores(monkeypatch, impl):
    """_topk_block on crafted scores: a strided pattern that defeats the sample (the direct fallback),
    +0.0 / -0.0 ties, short rows, rows with nothing visible."""
    monkeypatch.setattr(cpu_indexer, "_SAMPLE_HITS", 4)
    T, S, k = 8, 2048, 64
    g = _gen(5)
    s = torch.randn(T, S, generator=g)
    m = k // 4
    s[0] = torch.rand(S, generator=g)
    s[0, : 40 * m: m] = 5.0  # 40 < k high keys, all at sampled positions: the sample threshold leaves < k keys
    s[1] = 0.0
    s[1, 1::2] = -0.0
    s[2, :] = torch.randint(-3, 3, (S,), generator=g).float()  # heavy ties
    ks = torch.tensor([0, 0, 0, 100, 0, 50, 2000, 0])
    ke = torch.tensor([S, S, S, 130, S, S, 2000, S - 7])
    expect = ref.ascending(ref.select_topk(s[None], ks[None], ke[None], k))[0]
    # the whole block (row 1 has too many candidates: all direct), one row at a time, all rows but 1
    for rows in [list(range(T))] + [[r] for r in range(T)] + [[0, 2, 3, 4, 5, 6, 7]]:
        for prefilter in (True, False):
            out = torch.full((len(rows), k), -7, dtype=torch.long)
            cpu_indexer._topk_block(s[rows].clone(), 0, ks[rows], ke[rows], out, S, prefilter=prefilter)
            assert torch.equal(out, expect[rows]), (rows, prefilter)


def test_indexer_topk_edge_cases(impl):
    q, w, k, _ = _index_inputs(2, 3, 50, 4, 16, seed=7)
    ks, ke = _causal(2, 3, 50)
    assert cpu.indexer_topk(q, w, k, None, ks, ke, 0).shape == (2, 3, 0)
    ke[1] = ks[1]  # a batch row whose queries see nothing
    out = cpu.indexer_topk(q, w, k, None, ks, ke, 8)
    assert torch.equal(out, _ref_topk(q, w, k, None, ks, ke, 8)) and (out[1] == -1).all()


def test_indexer_topk_bf16_overlap(impl):
    B, T, S, H, D, topk = 1, 64, 2048, 4, 64, 256
    q, w, k, _ = _index_inputs(B, T, S, H, D, seed=6, dtype=torch.bfloat16)
    ks, ke = _causal(B, T, S)
    out = cpu.indexer_topk(q, w, k, None, ks, ke, topk)
    expect = _ref_topk(q.float(), w, k.float(), None, ks, ke, topk)
    hits = sum(len(set(out[0, t].tolist()) & set(expect[0, t].tolist())) for t in range(T))
    assert hits / (T * topk) >= 0.98


def test_native_bf16_scores_match_torch():
    """bf16: the fused C epilogue gives the PyTorch path's scores up to fp32 summation order, and the sets
    agree (a sampled threshold, k_scale, and a key tile boundary inside the block)."""
    if native.lib() is None:
        pytest.skip("the native CPU kernels are not built here (no C compiler)")
    B, T, S, H, D, topk = 2, 48, 5000, 4, 64, 512
    q, w, k, ksc = _index_inputs(B, T, S, H, D, seed=8, scale=True, dtype=torch.bfloat16)
    fast = cpu_indexer._block_scores(q, w, k, ksc, torch.bfloat16)
    with native.disabled():
        plain = cpu_indexer._block_scores(q, w, k, ksc, torch.bfloat16)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    ks, ke = _causal(B, T, S)
    out = cpu.indexer_topk(q, w, k, ksc, ks, ke, topk)
    with native.disabled():
        expect = cpu.indexer_topk(q, w, k, ksc, ks, ke, topk)
    same = sum(len(set(out[b, t].tolist()) & set(expect[b, t].tolist())) for b in range(B) for t in range(T))
    assert same / (B * T * topk) >= 0.999


# -- sparse_mla --------------------------------------------------------------------------------


def _attn_inputs(B, T, S, H, R, P, seed=0, dtype=torch.float32):
    g = _gen(seed)
    return [(torch.randn(*shape, generator=g) * s).to(dtype).requires_grad_()
            for shape, s in (((B, T, H, R), 0.3), ((B, T, H, P), 0.3), ((B, S, R), 1.0), ((B, S, P), 1.0))]


def _idx(B, T, S, K, seed=0, p_invalid=0.3):
    """Distinct keys per row, -1 anywhere; one all-invalid row and one block of causal-style trailing -1."""
    g = _gen(seed)
    idx = torch.stack([torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]) for _ in range(B)])
    idx[torch.rand(B, T, K, generator=g) < p_invalid] = -1
    idx[0, 1] = -1
    idx[-1, 2:6, K // 2:] = -1
    return idx


@pytest.mark.parametrize("B,T,S,H,R,P,K,block", [
    (2, 9, 40, 3, 16, 8, 12, None),
    (1, 33, 300, 4, 32, 8, 64, None),
    (2, 17, 64, 2, 8, 4, 20, 1),  # one query per block
])
def test_sparse_mla_forward_and_grads(monkeypatch, B, T, S, H, R, P, K, block):
    if block is not None:
        monkeypatch.setattr(cpu_common, "BLOCK_BYTES", block)
    inputs = _attn_inputs(B, T, S, H, R, P)
    idx = _idx(B, T, S, K)
    out = cpu.sparse_mla(*inputs, idx, 0.37)
    expect = ref.sparse_mla_gathered(*inputs, idx, 0.37)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))  # all-invalid row
    go = torch.randn(out.shape, generator=_gen(9))
    got = torch.autograd.grad(out, inputs, go)
    want = torch.autograd.grad(expect, inputs, go)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0][0, 1], torch.zeros_like(got[0][0, 1]))


def test_sparse_mla_no_slots():
    inputs = _attn_inputs(1, 3, 5, 2, 8, 4)
    out = cpu.sparse_mla(*inputs, torch.zeros(1, 3, 0, dtype=torch.long), 0.5)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in inputs)


def test_sparse_mla_blocks_straddle_batch_rows(monkeypatch):
    """Query blocks run over the B*T rows of all batch rows: blocks that cross a batch boundary gather
    each query's keys from its own batch row (forward and gradients)."""
    B, T, S, H, R, P, K = 3, 9, 40, 3, 16, 8, 12
    monkeypatch.setattr(cpu_common, "BLOCK_BYTES", 4 * 4176)  # 10 rows per forward block, 4 per backward
    inputs = _attn_inputs(B, T, S, H, R, P, seed=5)
    idx = _idx(B, T, S, K, seed=5)
    out = cpu.sparse_mla(*inputs, idx, 0.4)
    expect = ref.sparse_mla_gathered(*inputs, idx, 0.4)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    go = torch.randn(out.shape, generator=_gen(5))
    for a, b in zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(expect, inputs, go)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batched_decode_over_a_ragged_cache_slice():
    """Decode at batch 4 reads slices `buffer[:, :S]` of a longer cache (rows of different lengths, as the
    engine's continuous batching leaves them): one block for all rows, no copy of the cache, exact."""
    B, S, cap, H, R, P, D, K = 4, 700, 1000, 4, 32, 8, 16, 64
    g = _gen(6)
    kv_buf, pe_buf, ik_buf = torch.randn(B, cap, R, generator=g), torch.randn(B, cap, P, generator=g), \
        torch.randn(B, cap, D, generator=g)
    kv, pe, ik = kv_buf[:, :S], pe_buf[:, :S], ik_buf[:, :S]
    assert not kv.is_contiguous()
    iq, iw = torch.randn(B, 1, H, D, generator=g), torch.randn(B, 1, H, generator=g) * (H * D) ** -0.5
    ks = torch.tensor([[0], [0], [250], [0]])
    ke = torch.tensor([[700], [40], [690], [65]])  # long, shorter than k, a document, just over k
    idx = cpu.indexer_topk(iq, iw, ik, None, ks, ke, K)
    assert torch.equal(idx, _ref_topk(iq, iw, ik.contiguous(), None, ks, ke, K))
    q_lat, q_pe = torch.randn(B, 1, H, R, generator=g) * 0.3, torch.randn(B, 1, H, P, generator=g) * 0.3
    flat, per = cpu_mla._flat_rows(kv)
    assert flat.data_ptr() == kv_buf.data_ptr() and per == cap  # the cache slice is viewed, not copied
    assert torch.equal(flat[2 * cap + 5], kv[2, 5])
    out = cpu.sparse_mla(q_lat, q_pe, kv, pe, idx, 0.3)
    torch.testing.assert_close(out, ref.sparse_mla_gathered(q_lat, q_pe, kv.contiguous(), pe.contiguous(), idx, 0.3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,T,S", [(2, 24, 600), (3, 2, 5000)])  # one [kv | pe] copy; decode (cache in place)
def test_sparse_mla_bf16_native_gradients_match_torch(B, T, S):
    """bf16: the C softmax (forward), softmax gradient and scatter-add (backward) give PyTorch's outputs,
    log-sum-exps and gradients up to bf16 rounding (batch > 1, -1 slots, keys chosen by several queries)."""
    if native.lib() is None:
        pytest.skip("the native CPU kernels are not built here (no C compiler)")
    H, R, P, K = 8, 64, 16, 256
    inputs = [t.detach().bfloat16() for t in _attn_inputs(B, T, S, H, R, P, seed=3)]
    idx = _idx(B, T, S, K, seed=3)
    outs, grads = [], []
    for off in (False, True):
        with native.disabled(off):
            xs = [t.clone().requires_grad_() for t in inputs]
            o, lse = cpu.sparse_mla_lse(*xs, idx, 0.2)
            o.float().square().sum().backward()
            outs.append((o.detach().float(), lse))
            grads.append([x.grad.float() for x in xs])
    (o1, lse1), (o2, lse2) = outs
    torch.testing.assert_close(o1, o2, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse1, lse2, atol=1e-5, rtol=1e-5)  # -inf on the all-invalid row in both
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=4e-3 * float(b.abs().max()), rtol=1e-2)


# -- masked_mha (masked MHA mode) ---------------------------------------------------------------


@pytest.mark.parametrize("B,T,W,H,K,rows,block_bytes", [
    (1, 7, 50, 2, 16, 512, 16 << 20),  # one block, every head at once
    (2, 40, 300, 4, 64, 16, 16 * 300 * 2),  # several query blocks, one head per group
    (1, 70, 333, 3, 100, 32, 2 * 32 * 333 * 2),  # heads in groups of 2 and 1, w not a multiple of 32
])
def test_masked_mha_native_matches_sdpa(monkeypatch, B, T, W, H, K, rows, block_bytes):
    """bf16 masked MHA mode in C (query blocks over their own key range, head groups, the softmax over the
    selected keys only) gives the reference's SDPA output up to bf16 rounding, and both are close to fp32:
    batch > 1, -1 slots, a query with no key, keys chosen by several queries."""
    if native.lib() is None:
        pytest.skip("the native CPU kernels are not built here (no C compiler)")
    from dsv32.kernels.cpu import mha as cpu_mha
    monkeypatch.setattr(cpu_mha, "MHA_ROWS", rows)
    monkeypatch.setattr(cpu_mha, "MHA_BLOCK_BYTES", block_bytes)
    g = _gen(5)
    D, V = 24, 16
    q = torch.randn(B, T, H, D, generator=g).bfloat16()
    k, v = (torch.randn(B, H, W, D, generator=g).bfloat16() for _ in range(2))
    idx = _idx(B, T, W, K, seed=5)
    idx[:, 3:] = torch.where(idx[:, 3:] >= 0, idx[:, 3:] // 2 + W // 3, -1)  # a window offset: lo > 0
    out = cpu.masked_mha(q, k, v, idx, 0.3, V)
    want = ref.masked_mha(q, k, v, idx, 0.3, V)
    exact = ref.masked_mha(q.float(), k.float(), v.float(), idx, 0.3, V)
    assert out.shape == (B, T, H, V) and out.dtype == torch.bfloat16
    assert torch.equal(out[0, 1], torch.zeros(H, V, dtype=torch.bfloat16))  # the query with no key
    torch.testing.assert_close(out.float(), exact, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=2e-2)
    with native.disabled():  # the plain path is the reference's call
        assert torch.equal(cpu.masked_mha(q, k, v, idx, 0.3, V), want)
    assert torch.equal(cpu.masked_mha(q.float(), k.float(), v.float(), idx, 0.3, V), exact)  # fp32: reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_absorbed_matches_einsum_then_sparse_mla(monkeypatch, dtype):
    """The absorption fused into the blocks (`sparse_mla_absorbed`) gives the output and the gradients of the
    einsum followed by `sparse_mla` (q_nope, W_UK, q_pe, kv, pe), over several blocks and batch rows; int32
    indices are accepted."""
    monkeypatch.setattr(cpu_mla, "BACKWARD_BLOCK_BYTES", 1)  # one query per backward block
    B, T, S, H, Nq, R, P, K = 2, 9, 40, 3, 8, 16, 4, 12
    g = _gen(11)
    q_nope = (torch.randn(B, T, H, Nq, generator=g) * 0.5).to(dtype)
    w_uk = (torch.randn(H, Nq, R, generator=g) * 0.3).to(dtype)
    _, q_pe, kv, pe = (t.detach().to(dtype) for t in _attn_inputs(B, T, S, H, R, P, seed=11))
    idx = _idx(B, T, S, K, seed=11)
    runs = []
    for fused in (True, False):
        xs = [t.clone().requires_grad_() for t in (q_nope, w_uk, q_pe, kv, pe)]
        if fused:
            o = cpu.sparse_mla_absorbed(xs[0], xs[1], *xs[2:], idx.to(torch.int32), 0.3)
        else:
            o = cpu.sparse_mla(torch.einsum("bthn,hnr->bthr", xs[0], xs[1]), *xs[2:], idx, 0.3)
        o.float().square().sum().backward()
        runs.append([o.detach().float()] + [x.grad.float() for x in xs])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else None
    for a, b in zip(*runs):
        if tol:
            torch.testing.assert_close(a, b, **tol)
        else:
            torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()), rtol=2e-2)


def test_sparse_mla_invalid_slots_never_touch_the_last_key():
    B, T, S, H, R, P, K = 1, 6, 30, 2, 8, 4, 10
    q_lat, q_pe, kv, pe = _attn_inputs(B, T, S, H, R, P, seed=1)
    idx = _idx(B, T, S - 1, K, seed=1)  # never the last key
    out = cpu.sparse_mla(q_lat, q_pe, kv, pe, idx, 0.5)
    out.sum().backward()
    assert torch.equal(kv.grad[:, -1], torch.zeros_like(kv.grad[:, -1]))
    assert torch.equal(pe.grad[:, -1], torch.zeros_like(pe.grad[:, -1]))


def test_sparse_mla_bf16_close_to_fp32():
    B, T, S, H, R, P, K = 1, 16, 256, 4, 64, 16, 64
    inputs = _attn_inputs(B, T, S, H, R, P, seed=2)
    idx = _idx(B, T, S, K, seed=2)
    o32 = ref.sparse_mla_gathered(*inputs, idx, 0.1)
    o16 = cpu.sparse_mla(*[t.detach().bfloat16().requires_grad_() for t in inputs], idx, 0.1)
    assert o16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.float(), o32, atol=3e-2, rtol=3e-2)


# -- indexer KL helpers ------------------------------------------------------------------------


def _dense_head_probs(q_lat, q_pe, kv, pe, mask_BTS, scale):
    """Brute force [B, T, H, S] per-head softmax over `mask` (zeros where nothing is visible)."""
    s = (torch.einsum("bthr,bsr->bths", q_lat, kv) + torch.einsum("bthp,bsp->bths", q_pe, pe)) * scale
    return ref._masked_softmax(s, mask_BTS[:, :, None, :])


def test_sparse_attn_target_matches_dense_brute_force():
    B, T, S, H, R, P, K = 2, 7, 30, 3, 8, 4, 9
    inputs = [t.detach() for t in _attn_inputs(B, T, S, H, R, P, seed=3)]
    idx = _idx(B, T, S, K, seed=3)
    p = cpu.sparse_attn_target(*inputs, idx, 0.6)
    probs = _dense_head_probs(*inputs, ref.selected_mask(idx, S), 0.6).sum(2)  # [B, T, S]
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-10)
    expect = torch.where(idx >= 0, probs.gather(-1, idx.clamp_min(0)), 0.0)
    torch.testing.assert_close(p, expect, atol=1e-6, rtol=1e-5)
    assert torch.equal(p[0, 1], torch.zeros(K))
    # From the forward's saved log-sum-exp: the same target
    _, lse = cpu.sparse_mla_lse(*inputs, idx, 0.6)
    torch.testing.assert_close(cpu.sparse_attn_target(*inputs, idx, 0.6, lse_BTH=lse), p, atol=1e-6, rtol=1e-5)


def test_indexer_scores_gathered_and_grads():
    B, T, S, H, D, K = 2, 6, 25, 3, 8, 7
    q, w, k, ksc = _index_inputs(B, T, S, H, D, seed=4, scale=True)
    leaves = [t.requires_grad_() for t in (q, w, k, ksc)]
    idx = _idx(B, T, S, K, seed=4)
    got = cpu.indexer_scores_gathered(*leaves, idx)
    full = ref.indexer_scores(*leaves)
    expect = torch.where(idx >= 0, full.gather(-1, idx.clamp_min(0)), 0.0)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    go = torch.randn(got.shape, generator=_gen(4))
    for a, b in zip(torch.autograd.grad(got, leaves, go), torch.autograd.grad(expect, leaves, go)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_indexer_kl_sparse_brute_force():
    B, T, K = 2, 5, 6
    g = _gen(5)
    idx = _idx(B, T, 20, K, seed=5)
    scores = torch.randn(B, T, K, generator=g, requires_grad=True)
    p = torch.rand(B, T, K, generator=g) * (idx >= 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-10)
    loss = cpu.indexer_kl_sparse(scores, p, idx)
    total, rows = 0.0, 0
    for b in range(B):
        for t in range(T):
            v = [j for j in range(K) if idx[b, t, j] >= 0]
            if not v:
                continue
            logq = torch.log_softmax(scores[b, t, v].double(), -1)
            pv = p[b, t, v].double()
            total = total + sum(float(pv[i]) * (math.log(float(pv[i])) - logq[i]) for i in range(len(v)) if pv[i] > 0)
            rows += 1
    expect = total / rows
    torch.testing.assert_close(loss.double(), expect, atol=1e-6, rtol=1e-6)
    (gs,) = torch.autograd.grad(loss, scores)
    (ge,) = torch.autograd.grad(expect, scores)
    torch.testing.assert_close(gs, ge.float(), atol=1e-6, rtol=1e-5)
    assert torch.equal(gs[0, 1], torch.zeros(K))  # the all-invalid row: no loss, no gradient, no NaN


def _dense_kl_brute(q_lat, q_pe, kv, pe, scale, iq, iw, ik, iks, ks, ke):
    S = kv.shape[1]
    mask = ref.valid_mask(ks, ke, S)
    p = _dense_head_probs(q_lat, q_pe, kv, pe, mask, scale).sum(2)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-10)
    I = ref.indexer_scores(iq, iw, ik, iks)
    row = mask.any(-1)
    logq = torch.log_softmax(I.masked_fill(~mask & row[..., None], float("-inf")), -1)
    kl = torch.where(mask, torch.xlogy(p, p) - p * torch.where(mask, logq, 0.0), 0.0).sum(-1)
    return kl[row].mean()


@pytest.mark.parametrize("q_block,k_block", [(None, None), (3, 7), (1, 64)])
def test_dense_attn_target_kl_brute_force(q_block, k_block):
    B, T, S, H, R, P, HI, D = 2, 10, 23, 3, 8, 4, 2, 8
    attn = [t.detach() for t in _attn_inputs(B, T, S, H, R, P, seed=6)]
    iq, iw, ik, iks = _index_inputs(B, T, S, HI, D, seed=6, scale=True)
    leaves = [t.requires_grad_() for t in (iq, iw, ik, iks)]
    ks, ke = _causal(B, T, S)
    ks[1, 5:] = 16  # a document starts at 16
    ke[0, 0] = 0  # a row with nothing visible
    got = cpu.dense_attn_target_kl(*attn, 0.45, *leaves, ks, ke, q_block=q_block, k_block=k_block)
    expect = _dense_kl_brute(*attn, 0.45, *leaves, ks, ke)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(2.0 * got, leaves), torch.autograd.grad(2.0 * expect, leaves)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the value alone (no gradients computed in the forward)
        torch.testing.assert_close(cpu.dense_attn_target_kl(*attn, 0.45, *leaves, ks, ke, q_block=q_block,
                                                            k_block=k_block), expect.detach(), atol=1e-6, rtol=1e-5)


def test_dense_attn_target_kl_no_grad_to_attention():
    B, T, S, H, R, P, HI, D = 1, 6, 6, 2, 8, 4, 2, 8
    attn = _attn_inputs(B, T, S, H, R, P, seed=7)
    iq, iw, ik, _ = _index_inputs(B, T, S, HI, D, seed=7)
    iq.requires_grad_()
    loss = cpu.dense_attn_target_kl(*attn, 0.5, iq, iw, ik, None, *_causal(B, T, S))
    loss.backward()
    assert iq.grad is not None and iq.grad.abs().sum() > 0
    assert all(t.grad is None for t in attn)


# -- memory: no T x S / 4 tensor ----------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op outputs (and which op)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.ops = 0, None, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def test_no_quadratic_tensor():
    T = S = 4096
    B, H, D, HA, R, P, K = 1, 2, 16, 2, 16, 8, 256
    q, w, k, ksc = _index_inputs(B, T, S, H, D, seed=8, scale=True)
    ks, ke = _causal(B, T, S)
    inputs = _attn_inputs(B, T, S, HA, R, P, seed=8)
    with _LargestTensor() as mode:
        idx = cpu.indexer_topk(q, w, k, ksc, ks, ke, K)
        out = cpu.sparse_mla(*inputs, idx, 0.3)
        out.backward(torch.ones_like(out))
    assert any(op.startswith("index_add_") for op in mode.ops)  # the backward ran under the mode
    assert mode.numel < T * S // 4, (mode.numel, mode.op)
    assert (idx[0, -1] >= 0).all() and (idx[0, :K - 1, -1] == -1).all()


# -- the model with the cpu backend ------------------------------------------------------------


@pytest.fixture
def _restore_backend():
    yield
    kernels.use(None)


def test_model_cpu_backend_matches_reference(_restore_backend):
    torch.manual_seed(0)
    model = scale_weights(Transformer(make_config())).set_attn_mode("sparse")
    x = torch.randint(0, 97, (2, 40), generator=_gen(10))
    doc_ids = torch.zeros(2, 40, dtype=torch.long)
    doc_ids[1, 17:] = 1  # packed documents in the second row
    results = {}
    for name in ("reference", "cpu"):
        kernels.use(name)
        assert kernels.get("cpu") is (cpu if name == "cpu" else kernels._Reference)
        model.zero_grad()
        tr = Trace()
        logits = model(x, doc_ids=doc_ids, trace=tr)
        logits.float().logsumexp(-1).mean().backward()
        results[name] = (logits.detach(), [t.clone() for t in tr.topk],
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l_ref, top_ref, g_ref), (l_cpu, top_cpu, g_cpu) = results["reference"], results["cpu"]
    assert all(t is not None for t in top_ref)  # the sparse path ran
    assert all(torch.equal(ref.ascending(a), b) for a, b in zip(top_ref, top_cpu))
    # fp32, but the prefill kernel sums a score over [R | P] in one matmul where the reference sums R and P
    # apart: logits near 0 differ by ~1e-5 after two layers
    torch.testing.assert_close(l_cpu, l_ref, atol=3e-5, rtol=1e-5)
    assert g_ref.keys() == g_cpu.keys() and len(g_ref) > 10
    for n in g_ref:
        torch.testing.assert_close(g_cpu[n], g_ref[n], atol=1e-5, rtol=1e-5, msg=n)


def test_model_bf16_training_absorbs_inside_the_kernel(monkeypatch):
    """bf16 training on the cpu backend runs `sparse_mla_absorbed` with int32 indices (no [B, T, H, R] queries
    or gradients stored); logits and gradients match the separate einsum + `sparse_mla` (the same sets) up to
    bf16 rounding (one layer, packed documents)."""
    import dsv32.model.attention as attention
    monkeypatch.setattr(attention.MLA, "_mha_cheaper", lambda self, *args, **kw: False)  # the absorbed path
    model = scale_weights(Transformer(make_config(n_layers=1))).set_attn_mode("sparse").bfloat16()
    x = torch.randint(0, 97, (2, 40), generator=_gen(12))
    doc_ids = torch.zeros(2, 40, dtype=torch.long)
    doc_ids[1, 17:] = 1
    calls, results = [], []
    for fused in (True, False):
        if fused:
            monkeypatch.setattr(cpu, "sparse_mla_absorbed",
                                lambda *a: calls.append(a[5].dtype) or cpu_mla.sparse_mla_absorbed(*a))
        else:
            monkeypatch.delattr(cpu, "sparse_mla_absorbed")
        model.zero_grad()
        logits = model(x, doc_ids=doc_ids)
        logits.float().logsumexp(-1).mean().backward()
        results.append((logits.detach().float(),
                        {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    assert calls == [torch.int32]
    (l_fused, g_fused), (l_plain, g_plain) = results
    torch.testing.assert_close(l_fused, l_plain, atol=0.02 * float(l_plain.abs().max()), rtol=0.02)
    assert g_plain.keys() == g_fused.keys() and "layers.0.attn.wkv_b.weight" in g_plain
    for n in g_plain:
        scale = float(g_plain[n].abs().max())
        torch.testing.assert_close(g_fused[n], g_plain[n], atol=0.03 * scale, rtol=0.03, msg=n)
