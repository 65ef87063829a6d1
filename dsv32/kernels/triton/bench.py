"""Timings of the triton backend on a GPU: `python -m dsv32.kernels.triton.bench [--sweep]`.

Prints milliseconds and TFLOP/s for the indexer (scores kernel, and scores + top-k) and sparse MLA
forward / forward+backward at the `small` and `v32` preset shapes (bf16, batch 1).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from .. import reference as ref
from . import indexer, mla


def _causal(T, S, device):
    ke = torch.arange(S - T + 1, S + 1, device=device)[None]
    return torch.zeros_like(ke), ke


def bench_indexer(T, S, H, D, topk, dtype=torch.bfloat16):
    dev = "cuda"
    q = torch.randn(1, T, H, D, device=dev, dtype=dtype)
    w = torch.randn(1, T, H, device=dev) * (H * D) ** -0.5
    k = torch.randn(1, S, D, device=dev, dtype=dtype)
    ks, ke = _causal(T, S, dev)
    flops = 2 * H * D * (ke - ks).sum().item()  # causal pairs only
    ms_scores = do_bench(lambda: indexer.indexer_scores(q, w, k, None, ks, ke))
    ms_topk = do_bench(lambda: indexer.indexer_topk(q, w, k, None, ks, ke, topk))
    ms_ref = do_bench(lambda: ref.indexer_scores(q, w, k, None))
    print(f"indexer T={T} S={S} H={H} D={D} k={topk}: scores {ms_scores:.3f} ms ({flops / ms_scores / 1e9:.0f} TFLOP/s "
          f"causal), scores+topk {ms_topk:.3f} ms; torch reference scores {ms_ref:.3f} ms")


def bench_mla(T, S, H, R, P, K, dtype=torch.bfloat16, sweep=False):
    dev = "cuda"
    q = torch.randn(1, T, H, R, device=dev, dtype=dtype)
    qp = torch.randn(1, T, H, P, device=dev, dtype=dtype)
    kv = torch.randn(1, S, R, device=dev, dtype=dtype)
    pe = torch.randn(1, S, P, device=dev, dtype=dtype)
    ks, ke = _causal(T, S, dev)
    idx = ref.select_topk(torch.rand(1, T, S, device=dev), ks, ke, K)
    n_valid = (idx >= 0).sum().item()
    f_fwd = 2 * H * n_valid * (R + P + R)
    f_bwd = 2 * H * n_valid * (R + P + R + R + R + P + R + R + P)  # s, dp, dq, dqp, dkv(2), dpe
    scale = (R + P) ** -0.5
    do = torch.randn_like(q)
    configs = [{}]
    if sweep:
        configs += [{"block_h": bh, "block_k": bk, "num_warps": nw, "num_stages": ns} for bh, bk, nw, ns in
                    ((16, 64, 4, 2), (16, 32, 4, 3), (32, 32, 4, 2), (64, 32, 8, 1), (64, 32, 8, 3), (64, 64, 8, 2),
                     (32, 32, 8, 3), (128, 32, 8, 2))]
    for cfg in configs:
        try:
            ms = do_bench(lambda cfg=cfg: mla.sparse_mla_fwd(q, qp, kv, pe, idx, scale, **cfg))
            print(f"sparse_mla fwd T={T} H={H} R={R} P={P} K={K} {cfg or 'default'}: {ms:.3f} ms "
                  f"({f_fwd / ms / 1e9:.0f} TFLOP/s)")
        except Exception as e:  # noqa: BLE001  (a config that does not fit: report and go on)
            print(f"sparse_mla fwd {cfg}: {type(e).__name__}: {str(e)[:200]}")
    o, lse = mla.sparse_mla_fwd(q, qp, kv, pe, idx, scale)
    bwd_configs = [{}]
    if sweep:
        bwd_configs += [{"block_h": bh, "block_k": bk, "num_warps": nw, "num_stages": ns} for bh, bk, nw, ns in
                        ((16, 16, 4, 2), (16, 32, 4, 1), (32, 16, 4, 1), (32, 32, 8, 2), (32, 64, 8, 1),
                         (64, 32, 8, 1), (16, 16, 2, 1))]
    for cfg in bwd_configs:
        try:
            ms = do_bench(lambda cfg=cfg: mla.sparse_mla_bwd(q, qp, kv, pe, idx, o, lse, do, scale, **cfg))
            print(f"sparse_mla bwd T={T} H={H} R={R} P={P} K={K} {cfg or 'default'}: {ms:.3f} ms "
                  f"({f_bwd / ms / 1e9:.0f} TFLOP/s)")
        except Exception as e:  # noqa: BLE001
            print(f"sparse_mla bwd {cfg}: {type(e).__name__}: {str(e)[:200]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also try other block sizes for sparse MLA")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    bench_indexer(4096, 4096, 4, 64, 2048)  # small preset
    bench_indexer(16384, 16384, 4, 64, 2048)
    bench_indexer(4096, 4096, 64, 128, 2048)  # v32 indexer
    bench_mla(4096, 4096, 16, 256, 32, 2048, sweep=args.sweep)  # small preset
    bench_mla(4096, 4096, 128, 512, 64, 2048, sweep=args.sweep)  # v32 MLA
    bench_mla(256, 4096, 128, 512, 64, 2048, dtype=torch.float32)  # fp32 at R=512: the shared-memory fallback


if __name__ == "__main__":
    main()
