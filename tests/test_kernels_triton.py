"""The triton kernel backend against the reference ops.

CPU tests run the kernels in Triton's interpreter (numpy), at tiny shapes. The interpreter works only
when TRITON_INTERPRET=1 is set before triton is first imported, so this module sets it when nothing has
imported triton yet and there is no GPU. Where triton was already imported without it (say a GPU session
that also runs compiled kernels), the CPU tests run once, together, in a pytest subprocess with the
variable set (and no GPU visible), and each test here reports its own outcome from there.

GPU tests (`-m gpu`) run the compiled kernels at a realistic size against the reference on the same GPU.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: see the docstring
pytest.importorskip("triton")

from conftest import make_config, scale_weights

from dsv32 import kernels
from dsv32.kernels import reference as ref
from dsv32.kernels import triton as tk
from dsv32.kernels.triton._jit import INTERPRETED

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _subprocess_outcomes() -> dict[str, tuple[str, str]]:
    """Run this module's CPU tests once in the interpreter, in a subprocess: {test name: (outcome, message)}."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        r = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-m", "not gpu", "-q",
                            "-p", "no:cacheprovider", f"--junitxml={xml}"],
                           check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if not xml.exists():
            return {"": ("error", r.stdout[-4000:] + r.stderr[-4000:])}
        out = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    msg = (el.get("message") or "") + (el.text or "")
            out[case.get("name")] = (outcome, msg)
        return out


def interpreted(test):
    """Run `test` here when triton is in interpreter mode, else report its outcome from the subprocess run."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if INTERPRETED:
            return test(*args, **kwargs)
        name = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0].split("::")[-1]
        outcomes = _subprocess_outcomes()
        outcome, msg = outcomes.get(name, outcomes.get("", ("missing", f"{name} did not run in the subprocess")))
        if outcome == "skipped":
            pytest.skip(msg)
        assert outcome == "passed", f"in the interpreter subprocess: {outcome}\n{msg}"
    return wrapper


# -- indexer ---------------------------------------------------------------------------------------

def _indexer_inputs(B, T, H, D, S, dtype=torch.float32, device="cpu", docs=None, scale=True, seed=0):
    """Random indexer inputs; queries are the last T of S positions (causal), optionally packed documents."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    w = (torch.randn(B, T, H, generator=g) * (H * D) ** -0.5).to(device)
    k = torch.randn(B, S, D, generator=g).to(device, dtype)
    k_scale = (torch.rand(B, S, generator=g) + 0.5).to(device) if scale else None
    pos = torch.arange(S - T, S, device=device).expand(B, T)
    ke = pos + 1
    ks = torch.zeros_like(ke)
    if docs:  # document starts per batch row: ks = the last start <= position
        for b, starts in enumerate(docs):
            st = torch.tensor(starts, device=device)
            ks[b] = st[(st[None, :] <= pos[b][:, None]).sum(-1) - 1]
    return q, w, k, k_scale, ks, ke


def _reference_topk(q, w, k, k_scale, ks, ke, topk):
    return ref.select_topk(ref.indexer_scores(q, w, k, k_scale), ks, ke, topk)


@interpreted
@pytest.mark.parametrize("scale", [True, False])
def test_indexer_scores_match_reference(scale):
    q, w, k, k_scale, ks, ke = _indexer_inputs(2, 20, 4, 16, 70, docs=[[0], [0, 41]], scale=scale)
    got = tk.indexer_scores(q, w, k, k_scale, ks, ke)
    want = ref.indexer_scores(q, w, k, k_scale)
    valid = ref.valid_mask(ks, ke, 70)
    assert (got[valid] - want[valid]).abs().max().item() <= 1e-5
    assert (got[~valid] == float("-inf")).all()


@interpreted
@pytest.mark.parametrize("case", ["s_lt_k", "s_eq_k", "s_gg_k", "packed", "decode", "chunked", "ties", "bf16", "d24"])
def test_indexer_topk_matches_reference(case):
    B, T, H, D, S, topk, docs, dtype = 2, 16, 4, 16, 16, 8, None, torch.float32
    extra = {}
    if case == "s_lt_k":
        topk = 24  # fewer keys than k: width S, the rest -1
    elif case == "s_eq_k":
        topk = 16
    elif case == "s_gg_k":
        T, S, topk = 40, 150, 8  # a cached prefix of 110 keys
    elif case == "packed":
        T, S, docs = 48, 48, [[0, 10, 30], [0, 5, 6, 40]]
    elif case == "decode":
        T, S = 1, 100
    elif case == "chunked":
        T, S = 70, 90
        extra = {"chunk_elems": B * S * 3, "block_t": 16, "block_s": 32}  # 24 chunks of 3 queries
    elif case == "ties":
        T, S = 24, 40
    elif case == "bf16":
        T, S, dtype = 24, 40, torch.bfloat16
    elif case == "d24":
        T, S, D = 24, 40, 24  # head dim not a power of 2
    q, w, k, k_scale, ks, ke = _indexer_inputs(B, T, H, D, S, dtype=dtype, docs=docs)
    if case == "ties":
        w[0, ::2] = 0.0  # every score 0: the lowest visible indices win
        k[1, ::3] = 0.0  # plateaus of exact zeros among real scores
    got = tk.indexer_topk(q, w, k, k_scale, ks, ke, topk, **extra)
    want = _reference_topk(q, w, k, k_scale, ks, ke, topk)
    assert got.dtype == torch.int64 and got.shape == want.shape == (B, T, min(topk, S))
    assert torch.equal(got, want)
    # never a key outside the query's range; -1 exactly where fewer than k keys are visible
    sel = got >= 0
    assert ((got >= ks[..., None]) & (got < ke[..., None]))[sel].all()
    assert torch.equal(sel.sum(-1), (ke - ks).clamp(max=min(topk, S)))
    if case == "ties":
        assert torch.equal(got[0, ::2], (ks[0, ::2, None] + torch.arange(topk)).where(sel[0, ::2], -1))


@interpreted
def test_indexer_topk_empty_rows_and_backend_lookup():
    q, w, k, k_scale, ks, ke = _indexer_inputs(1, 6, 2, 16, 12)
    ke[0, :3] = ks[0, :3]  # no visible key at all
    got = tk.indexer_topk(q, w, k, k_scale, ks, ke, 4)
    assert (got[0, :3] == -1).all()
    assert torch.equal(got, _reference_topk(q, w, k, k_scale, ks, ke, 4))
    kernels.use("triton")
    try:
        assert kernels.get("cpu") is tk
    finally:
        kernels.use(None)


# -- sparse MLA ------------------------------------------------------------------------------------

def _mla_inputs(B, T, H, R, P, S, K, dtype=torch.float32, device="cpu", n_invalid=3, seed=0):
    """Random latents and top-k sets (distinct keys, causal-looking -1 tails, one all-invalid row)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    q_lat, q_pe, kv, pe = mk(B, T, H, R), mk(B, T, H, P), mk(B, S, R), mk(B, S, P)
    idx = torch.argsort(torch.rand(B, T, S, generator=g), dim=-1)[..., :K].to(device)
    if n_invalid:
        idx[:, :, K - n_invalid:] = -1
        idx[:, 1, ::2] = -1  # -1 slots in the middle
    idx[0, 0] = -1  # a row with nothing to attend to
    return q_lat, q_pe, kv, pe, idx


@interpreted
@pytest.mark.parametrize("R,P", [(24, 8), (32, 16)])
@pytest.mark.parametrize("H,K,blocks", [(4, 20, None), (20, 13, {"fwd": {"block_h": 16, "block_k": 16},
                                                                  "bwd": {"block_h": 16, "block_k": 16}})])
def test_sparse_mla_matches_reference(R, P, H, K, blocks):
    q_lat, q_pe, kv, pe, idx = _mla_inputs(2, 5, H, R, P, 40, K)
    _check(q_lat, q_pe, kv, pe, idx, (R + P) ** -0.5, 1e-4, blocks)


def _check(q_lat, q_pe, kv, pe, idx, scale, tol, blocks=None, grad_tol=None):
    leaves = [x.detach().float().requires_grad_() for x in (q_lat, q_pe, kv, pe)]
    o_ref = ref.sparse_mla_gathered(*leaves, idx, scale)
    o = tk.sparse_mla(q_lat, q_pe, kv, pe, idx, scale, blocks)
    assert o.dtype == q_lat.dtype and o.shape == o_ref.shape
    err = (o.float() - o_ref).abs().max().item()
    assert err <= tol, f"o: {err}"
    assert (o[(idx < 0).all(-1)] == 0).all()
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1)).to(o_ref.device)
    grads = torch.autograd.grad(o, (q_lat, q_pe, kv, pe), do.to(o.dtype))
    grads_ref = torch.autograd.grad(o_ref, leaves, do)
    for name, g, gr in zip(("q_lat", "q_pe", "kv", "pe"), grads, grads_ref):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        err = (g.float() - gr).abs().max().item()
        assert err <= (grad_tol or tol), f"d{name}: {err}"


@interpreted
def test_sparse_mla_edge_cases():
    # K < 16 (one partial block), a strided cache slice for kv/pe, every row of one batch empty
    q_lat, q_pe, kv_big, pe_big, idx = _mla_inputs(2, 4, 4, 24, 8, 30, 5, n_invalid=1)
    kv, pe = kv_big[:, 3:27], pe_big[:, 3:27]  # S = 24, batch stride 30 rows
    idx = torch.where(idx >= 24, -1, idx)
    idx[1] = -1
    _check(q_lat, q_pe, kv, pe, idx, 0.3, 1e-4)
    # duplicated slots count twice, as in the reference
    q_lat, q_pe, kv, pe, idx = _mla_inputs(1, 3, 4, 32, 16, 20, 6, n_invalid=0)
    idx[0, 1, :3] = 7
    _check(q_lat, q_pe, kv, pe, idx, 0.25, 1e-4)


@interpreted
def test_sparse_mla_bf16():
    q_lat, q_pe, kv, pe, idx = _mla_inputs(2, 4, 4, 32, 16, 40, 20, dtype=torch.bfloat16)
    _check(q_lat, q_pe, kv, pe, idx, 48 ** -0.5, 3e-2, grad_tol=6e-2)


@interpreted
def test_sparse_model_forward_backward_matches_reference_backend():
    from dsv32 import Trace, Transformer

    model = scale_weights(Transformer(make_config(attn_mode="sparse")))
    ids = torch.randint(0, 97, (2, 20))
    outs = {}
    for name in ("reference", "triton"):
        kernels.use(name)
        try:
            model.zero_grad()
            trace = Trace()
            logits = model(ids, trace=trace)
            logits.float().square().mean().backward()
            grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            outs[name] = logits.detach(), grad, trace.topk
        finally:
            kernels.use(None)
    (lr, gr, tr), (lt, gt, tt) = outs["reference"], outs["triton"]
    assert any(t is not None for t in tt)  # the sparse path ran
    for a, b in zip(tr, tt):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (lr - lt).abs().max().item() <= 1e-4
    for n in gr:
        assert (gr[n] - gt[n]).abs().max().item() <= 1e-4 * max(1.0, gr[n].abs().max().item()), n


# -- GPU: compiled kernels at a realistic size -----------------------------------------------------

@pytest.fixture
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("_exact_fp32")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_indexer_topk(dtype):
    B, T, H, D, S, topk = 1, 4096, 16, 64, 4096, 2048
    q, w, k, k_scale, ks, ke = _indexer_inputs(B, T, H, D, S, dtype=dtype, device="cuda")
    scores = tk.indexer_scores(q, w, k, k_scale, ks, ke)
    want_scores = ref.indexer_scores(q, w, k, k_scale)
    valid = ref.valid_mask(ks, ke, S)
    assert (scores[valid] - want_scores[valid]).abs().max().item() <= 1e-4 * want_scores[valid].abs().max().item()
    got = tk.indexer_topk(q, w, k, k_scale, ks, ke, topk, chunk_elems=S * 1000)  # 5 chunks
    assert torch.equal(got, ref.select_topk(scores, ks, ke, topk))  # selection: exact on the kernel's scores
    want = ref.select_topk(want_scores, ks, ke, topk)
    same = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
    assert same >= 0.99, same  # sets: equal but for last-bit rounding at the k-th score


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("_exact_fp32")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sparse_mla(dtype):
    B, T, H, R, P, S, K = 1, 4096, 16, 256, 32, 4096, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype).requires_grad_()
    q_lat, q_pe, kv, pe = mk(B, T, H, R), mk(B, T, H, P), mk(B, S, R), mk(B, S, P)
    ke = torch.arange(1, T + 1, device="cuda")[None]
    idx = ref.select_topk(torch.rand(B, T, S, generator=g, device="cuda"), torch.zeros_like(ke), ke, K)
    if dtype == torch.float32:
        _check(q_lat, q_pe, kv, pe, idx, (R + P) ** -0.5, 1e-4)
    else:
        _check(q_lat, q_pe, kv, pe, idx, (R + P) ** -0.5, 2e-2, grad_tol=1e-1)
