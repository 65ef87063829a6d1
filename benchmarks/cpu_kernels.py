"""Timing of the CPU DSA kernels (dsv32/kernels/cpu.py) against the reference ops and dense SDPA.

Shapes of the `small` preset (one attention layer): 16 heads, kv_lora_rank 256, rope 32, qk_nope 64,
v 64; indexer 4 heads x 64, top-k 2048. Not a test; run for example

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_kernels.py --L 8192 --dtype bfloat16

Prints milliseconds for: prefill (indexer top-k + sparse MLA forward), sparse fwd+bwd, decode (one
query against an L-token cache, batch 1), each beside the dense baselines (SDPA causal over per-head
keys as the model's MHA path computes it; absorbed dense decode over the latent cache as
`reference.mla_masked` does it). The reference sparse op gathers [T, K, R] at once, so it is timed on
the last `--ref-rows` queries only and scaled up (marked "~").
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsv32.kernels import cpu
from dsv32.kernels import reference as ref

H, R, P, N, V = 16, 256, 32, 64, 64
HI, DI, TOPK = 4, 64, 2048


WARMUP = True


def timed(fn, reps: int = 1) -> float:
    if WARMUP:
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--ref-rows", type=int, default=256)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SDPA prefill baselines (slow)")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--no-warmup", action="store_true", help="time the first call (long runs)")
    a = ap.parse_args()
    global WARMUP
    WARMUP = not a.no_warmup
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    L = a.L
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt)

    scale = (N + P) ** -0.5
    q_lat, q_pe = rnd(1, L, H, R, s=0.1), rnd(1, L, H, P)
    kv, pe = rnd(1, L, R), rnd(1, L, P)
    iq, iw, ik = rnd(1, L, HI, DI), torch.randn(1, L, HI, generator=g) * (HI * DI) ** -0.5, rnd(1, L, DI)
    ks = torch.zeros(1, L, dtype=torch.long)
    ke = torch.arange(1, L + 1)[None]
    print(f"L={L} dtype={a.dtype} threads={torch.get_num_threads()} H={H} R={R} P={P} index {HI}x{DI} topk={TOPK}")

    # ---- prefill ----
    t_idx = timed(lambda: cpu.indexer_topk(iq, iw, ik, None, ks, ke, TOPK))
    idx = cpu.indexer_topk(iq, iw, ik, None, ks, ke, TOPK)
    t_att = timed(lambda: cpu.sparse_mla(q_lat, q_pe, kv, pe, idx, scale))
    print(f"prefill  cpu: indexer_topk {t_idx:9.1f} ms  sparse_mla fwd {t_att:9.1f} ms  total {t_idx + t_att:9.1f} ms")
    n = min(a.ref_rows, L)
    sl = slice(L - n, L)
    if L <= 16384:  # the reference materialises [T, S] fp32 scores and int64 sort keys
        t_ref_idx = f"{timed(lambda: ref.select_topk(ref.indexer_scores(iq, iw, ik), ks, ke, TOPK)):9.1f}"
    else:
        t_ref_idx = f"{'skipped':>9s}"
    t_ref_att = timed(lambda: ref.sparse_mla_gathered(q_lat[:, sl], q_pe[:, sl], kv, pe, idx[:, sl], scale)) * L / n
    print(f"prefill  ref: indexer_topk {t_ref_idx} ms  sparse_mla fwd ~{t_ref_att:8.1f} ms")
    if not a.no_dense:
        q = rnd(1, H, L, N + P)
        k, v = rnd(1, H, L, N + P), rnd(1, H, L, N + P)  # v padded to the qk dim, as the model's MHA path
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        print(f"prefill  dense SDPA causal fwd {t_sdpa:9.1f} ms   -> speed-up {t_sdpa / (t_idx + t_att):.2f}x")

    # ---- training: sparse fwd+bwd ----
    if not a.no_bwd:
        leaves = [t.detach().requires_grad_() for t in (q_lat, q_pe, kv, pe)]
        go = rnd(1, L, H, R)

        def fb():
            o = cpu.sparse_mla(*leaves, idx, scale)
            torch.autograd.backward(o, go)

        t_fb = timed(fb)
        print(f"train    cpu: sparse_mla fwd+bwd {t_fb:9.1f} ms  (+ indexer_topk {t_idx:.1f} ms)")
        if not a.no_dense:
            qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))

            def dfb():
                o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
                o.backward(torch.ones_like(o))

            t_dfb = timed(dfb)
            print(f"train    dense SDPA causal fwd+bwd {t_dfb:9.1f} ms   -> speed-up {t_dfb / (t_fb + t_idx):.2f}x")

    # ---- decode: one new query against an L-token cache ----
    ks1, ke1 = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), L)
    sq = slice(L - 1, L)

    def dec():
        i = cpu.indexer_topk(iq[:, sq], iw[:, sq], ik, None, ks1, ke1, TOPK)
        return cpu.sparse_mla(q_lat[:, sq], q_pe[:, sq], kv, pe, i, scale)

    t_dec = timed(dec, 20)
    mask = torch.ones(1, 1, L, dtype=torch.bool)
    t_dense_dec = timed(lambda: ref.mla_masked(q_lat[:, sq], q_pe[:, sq], kv, pe, mask, scale), 20)
    q1 = rnd(1, H, 1, N + P)
    kk, vv = rnd(1, H, L, N + P), rnd(1, H, L, N + P)
    t_sdpa_dec = timed(lambda: F.scaled_dot_product_attention(q1, kk, vv, scale=scale), 20)
    print(f"decode   cpu: {t_dec:7.2f} ms   dense absorbed (mla_masked) {t_dense_dec:7.2f} ms "
          f"({t_dense_dec / t_dec:.2f}x)   dense SDPA per-head cache {t_sdpa_dec:7.2f} ms ({t_sdpa_dec / t_dec:.2f}x)")


if __name__ == "__main__":
    main()
