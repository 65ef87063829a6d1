"""The `dsv32` command (also `python -m dsv32`).

    dsv32 demo                 the tiny model end to end (what `make demo` runs)
    dsv32 presets              the model presets and their sizes
    dsv32 info DIR             what a Hugging Face DeepSeek-V3.2 checkpoint directory holds
    dsv32 bench attention      DSA against dense MLA and transformers, one layer (what `make bench` runs)
    dsv32 pretrain             dense pre-training (LM loss; the indexer is excluded)
    dsv32 dsa-warmup           DSA stage 1: dense attention, only the indexer trains on its KL
    dsv32 dsa-sparse           DSA stage 2: top-k attention, LM loss + indexer KL, clipped apart
                               (each: --preset tiny --init-from DIR --out DIR --steps N --lr X --batch-size B
                                --seq-len T --seed S --model.indexer.topk=32 ...; writes OUT/final/)
    dsv32 dsa-recipe           pretrain -> stage 1 -> stage 2 beside a dense control, then recall, held-out loss and
                               retrieval by length into OUT/report.json (--out DIR [--from STAGE] [--seq-len ...])
    dsv32 eval long-context    retrieval accuracy (passkey, kv-recall) by length, dense vs sparse attention
                               (--model DIR --lengths 512,1024 [--n 8] [--out FILE.json])
    dsv32 eval suites          held-out task accuracy per domain and thinking mode, greedy (--model DIR
                                [--tasks FILE.jsonl] [--n N] [--mode thinking|non-thinking|both] [--out FILE.json])
    dsv32 sft                  SFT on chat conversations, loss on assistant tokens (--init-from DIR --out DIR
                                [--domains math:3,tool:2] [--data FILE.jsonl] [--mode both] [--steps N --lr X])
    dsv32 rl                   GRPO with the V3.2 fixes and the divergence guard (--preset tiny-math --init-from DIR
                                --out DIR [--steps N --minutes M --loss.beta=0.001 ...]; writes OUT/final/, report.json)
    dsv32 distill generate     a specialist's best-of-N verified answers in both modes as JSONL records
                                (--model DIR --domain math --out FILE.jsonl [--prompts N --samples N])
    dsv32 distill train        SFT of one generalist on the records, optional on-policy reverse KL
                                (--init-from DIR --data FILE.jsonl --out DIR [--on-policy-steps N --teacher math=DIR])
    dsv32 pipeline             every stage: DSA recipe, SFT, specialists, data, distillation, mixed RL, Speciale,
                                evaluation, report (--preset tiny|micro --out DIR [--from STAGE] [--sft.steps=N])
    dsv32 serve --model DIR    OpenAI-compatible server (--host 127.0.0.1 --port 8000 --api-key K --max-batch 32)
    dsv32 chat --model DIR     terminal chat, streaming; /think toggles thinking, /reset, /exit
    dsv32 bench serve          decode tokens/s at batch 1, 8, 32, dense and sparse, short and long context
"""

from __future__ import annotations

import argparse
import sys


def _presets(args) -> None:
    from . import presets

    print(f"{'preset':8} {'params':>10} {'active':>10} {'layers':>6} {'dim':>5} {'heads':>5} {'experts':>8} "
          f"{'indexer':>8} {'top-k':>6}")
    for name in presets.PRESETS:
        cfg = presets.get(name)
        total, active = presets.count_params(cfg)
        print(f"{name:8} {_fmt(total):>10} {_fmt(active):>10} {cfg.n_layers:>6} {cfg.dim:>5} {cfg.mla.n_heads:>5} "
              f"{cfg.moe.n_routed_experts:>8} {f'{cfg.indexer.n_heads}x{cfg.indexer.head_dim}':>8} {cfg.indexer.topk:>6}")


def _fmt(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _info(args) -> None:
    import json
    from pathlib import Path

    from .model.hf import config_from_hf

    cfg_file = Path(args.path) / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{args.path}: no config.json; expected a Hugging Face DeepseekV32ForCausalLM directory")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    print(json.dumps(cfg.to_dict(), indent=2))


def _eval(rest: list[str]) -> int:
    suites = ("long-context", "suites")
    if not rest or rest[0] not in suites:
        raise ValueError(f"eval: name a suite ({', '.join(suites)}), e.g. "
                         "`dsv32 eval long-context --model DIR --lengths 512,1024`")
    if rest[0] == "suites":
        from .eval import suites as task_suites

        return task_suites.main(rest[1:])
    from .eval import long_context

    return long_context.main(rest[1:])


def _distill(rest: list[str]) -> int:
    if not rest or rest[0] not in ("generate", "train"):
        raise ValueError("distill: name a step, `dsv32 distill generate --model DIR --domain math --out FILE.jsonl` "
                         "or `dsv32 distill train --init-from DIR --data FILE.jsonl --out DIR`")
    if rest[0] == "generate":
        from .distill import generate

        return generate.main(rest[1:])
    from .distill import train

    return train.main(rest[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 training system (DSA, GRPO, distillation)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the tiny model end to end on a CPU", add_help=False)
    sub.add_parser("presets", help="model presets and their sizes")
    info = sub.add_parser("info", help="show the dsv32 config of a Hugging Face checkpoint directory")
    info.add_argument("path")
    sub.add_parser("bench", help="benchmarks: `dsv32 bench attention` (DSA against dense attention)", add_help=False)
    for name, help_ in (("pretrain", "dense pre-training (LM loss, indexer excluded)"),
                        ("dsa-warmup", "DSA stage 1: dense attention, only the indexer trains"),
                        ("dsa-sparse", "DSA stage 2: sparse attention, LM loss + indexer KL")):
        sub.add_parser(name, help=help_, add_help=False)
    sub.add_parser("dsa-recipe", help="the DSA recipe end to end with a dense control and its report", add_help=False)
    sub.add_parser("eval", help="evaluations: `dsv32 eval long-context --model DIR --lengths 512,1024`",
                   add_help=False)
    sub.add_parser("sft", help="SFT on chat conversations: `dsv32 sft --init-from DIR --out DIR`", add_help=False)
    sub.add_parser("rl", help="GRPO: `dsv32 rl --preset tiny-math --init-from DIR --out DIR`", add_help=False)
    sub.add_parser("distill", help="`dsv32 distill generate` (specialist data) / `dsv32 distill train` (generalist)",
                   add_help=False)
    sub.add_parser("pipeline", help="every stage end to end with its report: `dsv32 pipeline --preset tiny`",
                   add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible server: `dsv32 serve --model DIR`", add_help=False)
    sub.add_parser("chat", help="terminal chat: `dsv32 chat --model DIR`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "demo":
            from . import demo

            demo.main(rest)
            return 0
        if args.command == "bench":
            from . import bench

            return bench.main(rest)
        if args.command in ("pretrain", "dsa-warmup", "dsa-sparse"):
            from .train import stages

            return stages.main(args.command, rest)
        if args.command == "dsa-recipe":
            from .train import recipe

            return recipe.main(rest)
        if args.command == "eval":
            return _eval(rest)
        if args.command == "sft":
            from .train import sft

            return sft.main(rest)
        if args.command == "serve":
            from .serve import server

            return server.main(rest)
        if args.command == "chat":
            from .serve import chat_cli

            return chat_cli.main(rest)
        if args.command == "rl":
            from .rl import trainer

            return trainer.main(rest)
        if args.command == "distill":
            return _distill(rest)
        if args.command == "pipeline":
            from . import pipeline

            return pipeline.main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        {"presets": _presets, "info": _info}[args.command](args)
    except ValueError as e:  # user mistakes: one clear line, no traceback
        print(f"dsv32: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
