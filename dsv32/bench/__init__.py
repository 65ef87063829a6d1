"""Benchmarks (`dsv32 bench ...`; `make bench` runs the attention bench into runs/bench).

    dsv32 bench attention      one attention layer: DSA against dense MLA and transformers' DeepseekV32Attention
    dsv32 bench serve          the serving engine: decode tokens/s by batch, attention mode and context
"""

from __future__ import annotations

import argparse

BENCHES = {"attention": "one attention layer: DSA against dense MLA (SDPA) and transformers' DeepseekV32Attention",
           "serve": "the serving engine: decode tokens/s at batch 1, 8, 32, dense and sparse, short and long context"}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 bench", description="dsv32 benchmarks")
    sub = p.add_subparsers(dest="bench", required=True)
    for name, text in BENCHES.items():
        sub.add_parser(name, help=text, add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.bench == "attention":
        from . import attention

        return attention.main(rest)
    if args.bench == "serve":
        from ..serve import bench

        return bench.main(rest)
    p.error(f"unknown bench {args.bench!r}")
    return 2
