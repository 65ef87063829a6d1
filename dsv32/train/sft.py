"""Supervised fine-tuning on chat conversations: the cold start before RL, and sequence-level distillation
(rl-distill-anchors.md §4.1, §6.2 "SFT"): loss only on what the assistant generates (reasoning, content,
tool calls, EOS), with the masks of `dsv32.data.chat.encode_for_training`, in both thinking modes.

    dsv32 sft --init-from runs/pre/final --out runs/sft                 # the tiny recipe: generated tasks, both modes
    dsv32 sft --init-from DIR --data distill.jsonl --out runs/gen        # distillation records (issue 7)
    dsv32 sft --init-from DIR --domains math:2,tool --mode thinking --steps 300 --lr 2e-3

    summary = sft.run_recipe(model, sft.RECIPES["tiny"], "runs/sft")   # the same from Python (the pipeline)

    torchrun --nproc-per-node 2 -m dsv32 sft --init-from DIR --out runs/sft2   # data-parallel, FSDP2, DCP checkpoints

Conversations come from generated tasks (`dsv32.rl.tasks.task_messages`) or from JSONL records
`{messages, reasoning_content, mode, domain, source_model, verifier_scores}`. They are packed whole into rows
with `doc_ids` (attention stays inside each conversation) and run through the shared loop (`loop.train`:
checkpoints, exact resume, metrics); sparse checkpoints train sparse, with the indexer on its KL (as stage 2).
Writes `OUT/final/` (Hugging Face format), like the other stages.

Legend: N rows, L = T + 1 tokens per row, B batch size, T sequence length.
"""

from __future__ import annotations

import argparse
import bisect
import random
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..data.loaders import IGNORE
from ..data.tokenizer import THINK_BEGIN, THINK_END, ByteTokenizer
from ..io import iter_jsonl
from ..model import Trace
from .loop import train
from .optim import ParamGroup, TrainConfig

MODES = {"thinking": True, "non_thinking": False, "non-thinking": False}


@dataclass
class Recipe:
    """What an SFT run trains on and for how long; `dsv32 sft --recipe NAME` starts from one, flags override.

    `domains` maps a task domain to its weight: `tasks_per_domain * weight` tasks each, every one in each mode
    of `mode` ("both", "thinking", "non-thinking"); a byte-level tool prompt is ~8x a math prompt, so the
    weights balance tokens, not tasks."""
    domains: dict = field(default_factory=dict)
    tasks_per_domain: int = 300
    difficulty: int = 1
    mode: str = "both"
    steps: int = 250
    lr: float = 3e-3
    batch_size: int = 8
    seq_len: int = 600
    warmup_steps: int = 20
    seed: int = 0
    # thinking traces of chain tasks end with their self-check (`rl.tasks.checked_solution`): True / 1.0 every one,
    # a fraction in (0, 1) that share of the tasks (spread evenly; the others keep the plain trace), False / 0 none
    check: float = 0.0
    block_penalty: float = 0.0   # `make_loss`: unlikelihood of <think>/</think> in non-thinking replies (0: off)


RECIPES = {
    # Measured from the tiny preset pretrained 400 steps (numbers: the SFT note of issues 6/7).
    "tiny": Recipe(domains={"math": 20, "tool": 2, "logic": 1, "countdown": 2, "alignment": 2}),
    # The base of the issue-6 math GRPO runs (tiny-math, tiny-hack): thinking-mode math from a fresh tiny model.
    # `dsv32 sft --recipe tiny-rl --ckpt-every 25`, then tiny-math from step_00000150 (the first checkpoint with
    # well-formed replies, format reward 0.98) and tiny-hack from step_00000175. Held-out greedy accuracy measured at
    # steps 150 / 175 / 200: 0.26 / 0.55 / 0.74 (train problems 0.39 / 0.66 / 0.82). At 300 steps SFT alone
    # reaches 0.98, which leaves RL nothing to add.
    "tiny-rl": Recipe(domains={"math": 5}, mode="thinking", steps=200, batch_size=16, seq_len=256),
    # Math and tool use from the pipeline's pretrained tiny model (300 steps): math 0.24, tool success only 0.04
    # greedy and 0.004 sampled (the model does not yet copy names and numbers into calls and out of tool
    # outputs), so GRPO groups on tool tasks have no reward variance. Continued on tool alone (`--domains tool:3
    # --steps 150 --lr 2e-3`), copying clicks: step 75 0.265, step 100 0.505 (the tiny-tool base).
    "tiny-rl-tool": Recipe(domains={"math": 5, "tool": 3}, mode="thinking", steps=300, batch_size=16, seq_len=256),
    # The `dsv32 pipeline --preset tiny` base (shared cold start of the specialists and the distillation): the
    # four specialist domains in both modes, math weighted up (the slowest to learn), rows of 256.
    "tiny-base": Recipe(domains={"math": 6, "tool": 2, "logic": 2, "alignment": 2}, steps=300, batch_size=16,
                        seq_len=256),
    # A few steps at a micro model: smoke runs and tests of the pipeline.
    "micro": Recipe(domains={"math": 2, "tool": 1, "logic": 1, "countdown": 1, "alignment": 1}, tasks_per_domain=4,
                    steps=4, batch_size=2, seq_len=480, warmup_steps=1),
}


@dataclass
class Example:
    ids: list[int]
    mask: list[int]      # 1 where the token is a training target (assistant-generated)
    domain: str
    thinking: bool
    learn: bool = True   # False: a negative example (a failed reply), no cross-entropy; only `block_penalty` sees it


def encode(messages: list[dict], tokenizer, *, thinking: bool, tools=None, domain: str = "") -> Example:
    from ..data.chat import encode_for_training

    ids, mask = encode_for_training(messages, tokenizer, thinking=thinking, tools=tools)
    return Example(list(ids), list(mask), domain, thinking)


def task_examples(domains: dict[str, int], n_per_domain: int, modes: list[bool], *, seed: int = 0,
                  difficulty: int = 1, tokenizer=None, check: float = 0.0) -> list[Example]:
    """Worked solutions of `n_per_domain * weight` generated training tasks per domain, in each mode; a domain
    with fewer distinct training tasks repeats them (so the weights still set the mix). `check`: the share of
    tasks whose thinking traces carry their self-check (`rl.tasks.task_messages`; True: all), spread evenly."""
    from ..rl import tasks as T

    if not 0.0 <= float(check) <= 1.0:
        raise ValueError(f"sft check={check!r}: give the share of checked thinking traces in [0, 1] (True: all)")
    tokenizer = tokenizer or ByteTokenizer()
    out = []
    for domain, weight in domains.items():
        want = n_per_domain * weight
        pool = T.make_tasks(domain, want, split="train", seed=seed, difficulty=difficulty, allow_fewer=True)
        checked = [int((i + 1) * check) > int(i * check) for i in range(len(pool))]   # evenly spread
        encoded = [encode(T.task_messages(task, thinking=thinking, check=c), tokenizer, thinking=thinking,
                          tools=T.tools_for(task), domain=domain)
                   for task, c in zip(pool, checked) for thinking in modes]
        out += [encoded[k % len(encoded)] for k in range(want * len(modes))]
    return out


def read_records(path) -> list[dict]:
    """Distillation records, one JSON object per line; a bad line raises ValueError naming file:line."""
    path, rows = Path(path), []
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a JSONL file of {{\"messages\": [...], \"mode\": ...}} records")
    for where, row in iter_jsonl(path, example='{"messages": [...], "mode": "thinking"}'):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message, so nothing to train on; add the reply")
        if row.get("mode", "thinking") not in MODES:
            raise ValueError(f"{where}: mode {row.get('mode')!r} must be 'thinking' or 'non_thinking'")
        row["_where"] = where
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records (the file is empty)")
    return rows


def record_example(row: dict, tokenizer) -> Example:
    """A record as an Example: top-level `reasoning_content` fills the last assistant turn's if it has none;
    tools are the record's `tools`, else the built-in specs of the tools its calls name when tools are
    described (`rl.tasks.DESCRIBE_TOOLS`, as `tools_for` does for generated tasks)."""
    from ..rl.tasks import DESCRIBE_TOOLS, TOOLS

    thinking = MODES[row.get("mode", "thinking")]
    negative = bool(row.get("negative", False))
    if negative and thinking:
        raise ValueError("a negative record (\"negative\": true) must be non-thinking: it only teaches that a "
                         "non-thinking reply holds no reasoning block; set \"mode\": \"non_thinking\" or drop it")
    msgs = [dict(m) for m in row["messages"]]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if thinking and not msgs[last].get("reasoning_content") and row.get("reasoning_content"):
        msgs[last]["reasoning_content"] = row["reasoning_content"]
    tools = row.get("tools")
    if tools is None and DESCRIBE_TOOLS:
        names = {c["function"]["name"] for m in msgs for c in (m.get("tool_calls") or [])}
        tools = [TOOLS[n] for n in sorted(names) if n in TOOLS] or None
    ex = encode(msgs, tokenizer, thinking=thinking, tools=tools, domain=str(row.get("domain", "data")))
    ex.learn = not negative
    return ex


def _best_fit(examples: list[Example], L: int, seed: int) -> list[list[int]]:
    """Rows of example indices: longest first, each into the row with the least room that still fits it
    (best-fit decreasing), so short conversations fill the gaps long tool conversations leave."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # ties in length: a seeded order
    order.sort(key=lambda i: -len(examples[i].ids))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = len(examples[i].ids)
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (L - n, len(rows) - 1))
        else:
            room, r = free.pop(at)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


class SFTData:
    """Examples packed whole into rows of L = seq_len + 1 tokens, served in a seeded order per epoch;
    resumable like `PackedDataset` (state: epoch, cursor). Batches carry labels masked to the assistant's
    tokens, `doc_ids` (one segment per conversation, -1 on padding) and `domain_ids` for per-domain loss."""

    def __init__(self, examples: list[Example], seq_len: int, seed: int = 0, pad_id: int | None = None):
        if not examples:
            raise ValueError("sft: no training examples; give --domains or --data")
        L, pad_id = seq_len + 1, ByteTokenizer().pad_id if pad_id is None else pad_id
        too_long = [e for e in examples if len(e.ids) > L]
        if too_long:
            raise ValueError(f"sft: {len(too_long)} conversations are longer than seq_len + 1 = {L} tokens (longest "
                             f"{max(len(e.ids) for e in too_long)}); raise --seq-len")
        self.domains = sorted({e.domain for e in examples})
        rows = _best_fit(examples, L, seed)
        N = len(rows)
        self.ids_NL = torch.full((N, L), pad_id, dtype=torch.long)
        self.mask_NL = torch.zeros(N, L, dtype=torch.bool)
        self.docs_NL = torch.full((N, L), -1, dtype=torch.long)
        self.dom_NL = torch.full((N, L), -1, dtype=torch.long)
        self.direct_NL = torch.zeros(N, L, dtype=torch.bool)   # tokens of non-thinking conversations
        self.learn_NL = torch.zeros(N, L, dtype=torch.bool)    # tokens of conversations with a cross-entropy
        for r, members in enumerate(rows):
            at = 0
            for seg, i in enumerate(members):
                e, n = examples[i], len(examples[i].ids)
                self.ids_NL[r, at:at + n] = torch.tensor(e.ids)
                self.mask_NL[r, at:at + n] = torch.tensor(e.mask, dtype=torch.bool)
                self.docs_NL[r, at:at + n] = seg
                self.dom_NL[r, at:at + n] = self.domains.index(e.domain)
                self.direct_NL[r, at:at + n] = not e.thinking
                self.learn_NL[r, at:at + n] = e.learn
                at += n
        self.seed, self.epoch, self.cursor, self._it = seed, 0, 0, None
        self.target_tokens = int((self.mask_NL & self.learn_NL).sum())   # cross-entropy targets

    def __len__(self) -> int:
        return self.ids_NL.shape[0]

    def batch(self, idx: torch.Tensor) -> dict:
        ids_BL, docs_BL = self.ids_NL[idx], self.docs_NL[idx]
        labels_BT = ids_BL[:, 1:].masked_fill(~self.mask_NL[idx, 1:], IGNORE)
        labels_BT[docs_BL[:, 1:] != docs_BL[:, :-1]] = IGNORE  # never predict across conversations
        return {"input_ids": ids_BL[:, :-1], "labels": labels_BT, "doc_ids": docs_BL[:, :-1],
                "domain_ids": self.dom_NL[idx, 1:], "non_thinking": self.direct_NL[idx, 1:],
                "learn": self.learn_NL[idx, 1:]}

    def batches(self, batch_size: int):
        if not 1 <= batch_size <= len(self):
            raise ValueError(f"sft: batch size {batch_size} but only {len(self)} packed rows; lower --batch-size "
                             "or add data")
        while True:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            while self.cursor + batch_size <= len(self):
                idx = order[self.cursor:self.cursor + batch_size]
                self.cursor += batch_size
                yield self.batch(idx)
            self.epoch, self.cursor = self.epoch + 1, 0

    def stream(self, batch_size: int) -> "SFTData":
        self.batch_size = batch_size
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self.batches(self.batch_size)
        return next(self._it)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rows": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self):
            raise ValueError(f"sft: the checkpoint's data had {state.get('rows')} rows, this data has {len(self)}; "
                             "resume with the same --domains/--data/--seq-len/--seed, or pass --no-resume")
        self.epoch, self.cursor, self.seed, self._it = int(state["epoch"]), int(state["cursor"]), int(state["seed"]), None


def make_loss(domains: list[str], block_penalty: float = 0.0):
    """Masked next-token CE (mean over target tokens), per-domain CE as extras; + indexer KL when sparse.

    `block_penalty` > 0 adds, on the target tokens of non-thinking conversations, the unlikelihood of opening or
    closing a reasoning block there, -log(1 - p(<think>) - p(</think>)) (mean, times the penalty): the template's
    rule that a non-thinking reply never holds either token, taught at every position of the reply, not only
    where the records happen to show the next token. Without it a distilled tiny model writes `x</think>y` after
    the non-thinking opener on prompts its records do not cover (measured: 1-2% of held-out replies).

    Negative examples (`Example.learn` False: a specialist's failed non-thinking replies) get no cross-entropy, only
    the penalty: they reach the states off the verified path (a tool output that says `no entry for X`) where a
    distilled model wrote `</think>` (unlikelihood training, Welleck et al. 2019, on the model family's own
    mistakes)."""
    block_ids = [ByteTokenizer().token_id(t) for t in (THINK_BEGIN, THINK_END)]

    def sft_loss(model, batch: dict):
        sparse = model.cfg.attn_mode == "sparse"
        trace = Trace(indexer_kl=[]) if sparse else None
        logits_BTV = model(batch["input_ids"], doc_ids=batch["doc_ids"], trace=trace)
        ce_BT = F.cross_entropy(logits_BTV.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                                reduction="none").view_as(batch["labels"])
        assistant_BT = batch["labels"] != IGNORE
        target_BT = assistant_BT & batch["learn"] if "learn" in batch else assistant_BT   # cross-entropy targets
        loss = distributed.global_mean((ce_BT * target_BT).sum(), target_BT.sum())  # under torchrun: global mean
        extras = {}
        for i, d in enumerate(domains):
            sel = target_BT & (batch["domain_ids"] == i)
            if sel.any():
                extras[f"sft_loss/{d}"] = (ce_BT[sel].mean()).item()
        if block_penalty > 0:
            direct_BT = assistant_BT & batch["non_thinking"]
            p_block = torch.softmax(logits_BTV[direct_BT].float(), -1)[:, block_ids].sum(-1)
            unlikely = distributed.global_mean(-torch.log1p(-p_block.clamp(max=1 - 1e-6)).sum(), direct_BT.sum())
            extras["non_thinking_block_p"] = p_block.mean().item() if p_block.numel() else 0.0
            loss = loss + block_penalty * unlikely
        if sparse:
            kl = torch.stack(trace.indexer_kl).mean()
            extras["indexer_kl"] = kl.item()
            return loss + kl, extras
        return loss, extras

    return sft_loss


def groups_for(model) -> list[ParamGroup]:
    """Dense: every parameter but the indexer (it gets no gradient densely). Sparse: main and indexer
    groups clipped apart, as DSA stage 2."""
    from .stages import is_indexer

    main = ParamGroup("main", lambda n: not is_indexer(n))
    return [main, ParamGroup("indexer", is_indexer)] if model.cfg.attn_mode == "sparse" else [main]


def run_sft(model, data: SFTData, cfg: TrainConfig, resume: bool = True, metrics=None,
            block_penalty: float = 0.0) -> dict:
    """SFT through the shared loop; the model keeps its attention mode (sparse checkpoints train sparse).

    Under torchrun (model `distributed.parallelize`d) each rank trains on its rows of every global batch; the
    loss is the global batch's token mean (`distributed.global_mean`), so the ranks together take one
    process's step on the whole batch."""
    world = distributed.current().world_size
    if cfg.batch_size % world:
        raise ValueError(f"sft: batch size {cfg.batch_size} (the global batch) is not a multiple of the {world} "
                         f"processes; pass --batch-size as a multiple of {world}")
    return train(model, data.stream(cfg.batch_size), cfg, loss_fn=make_loss(data.domains, block_penalty),
                 groups=groups_for(model),
                 metrics=metrics, resume=resume)


def parse_domains(text: str) -> dict[str, int]:
    """'math:3,tool' -> {"math": 3, "tool": 1}."""
    from ..rl.tasks import DOMAINS

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition(":")
        if name not in DOMAINS:
            raise ValueError(f"--domains: unknown domain {name!r}; choose from {', '.join(DOMAINS)} (weight: math:3)")
        if w and not (w.isdigit() and int(w) > 0):
            raise ValueError(f"--domains: weight of {name!r} must be a positive integer, got {w!r}")
        out[name] = int(w or 1)
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 sft", description="SFT on chat conversations (loss on assistant tokens)")
    p.add_argument("--recipe", default="tiny", help=f"starting point: {', '.join(RECIPES)} (default tiny); the "
                   "flags below override its fields")
    p.add_argument("--preset", default="tiny", help="model preset when not --init-from (default tiny)")
    p.add_argument("--init-from", default=None, metavar="DIR", help="a save_pretrained directory or a run directory")
    p.add_argument("--out", default="runs/sft", metavar="DIR")
    p.add_argument("--data", action="append", default=[], metavar="FILE.jsonl",
                   help="distillation records {messages, reasoning_content, mode, domain, ...} (repeatable); "
                        "with --data, generated tasks are added only when --domains is given")
    p.add_argument("--domains", default=None, help="generated task domains with weights, e.g. math:20,tool:2,logic")
    p.add_argument("--mode", default=None, choices=("both", "thinking", "non-thinking"))
    for name, kind in (("tasks-per-domain", int), ("difficulty", int), ("steps", int), ("lr", float),
                       ("batch-size", int), ("seq-len", int), ("warmup-steps", int), ("seed", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--block-penalty", type=float, default=None,
                   help="unlikelihood weight of <think>/</think> inside non-thinking replies (default 0: off)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (and, under torchrun, FSDP2 bf16 parameters with fp32 gradient reduction)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    return p


def build_examples(recipe: Recipe, data_files=(), tokenizer=None) -> list[Example]:
    """The recipe's generated-task conversations plus every record of the distillation files."""
    tok = tokenizer or ByteTokenizer()
    modes = {"both": [True, False], "thinking": [True], "non-thinking": [False]}[recipe.mode]
    examples = task_examples(recipe.domains, recipe.tasks_per_domain, modes, seed=recipe.seed,
                             difficulty=recipe.difficulty, tokenizer=tok, check=recipe.check) if recipe.domains else []
    for path in data_files:
        for row in read_records(path):
            try:
                examples.append(record_example(row, tok))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{row['_where']}: cannot render the conversation ({e}); check its messages") from None
    return examples


def run_recipe(model, recipe: Recipe, out_dir, data_files=(), resume: bool = True, log_every: int = 10,
               ckpt_every: int = 0, bf16: bool = False) -> dict:
    """Build the examples, train, write `out_dir/final/`; returns the loop's summary (+ "examples")."""
    tok = ByteTokenizer()
    if model.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"the byte tokenizer needs vocab_size >= {tok.vocab_size}; the model has {model.cfg.vocab_size}")
    examples = build_examples(recipe, data_files, tok)
    data = SFTData(examples, recipe.seq_len, recipe.seed)
    cfg = TrainConfig(lr=recipe.lr, steps=recipe.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
                      seed=recipe.seed, warmup_steps=min(recipe.warmup_steps, recipe.steps), log_every=log_every,
                      ckpt_every=ckpt_every, out_dir=str(out_dir), bf16=bf16)
    distributed.current().print(f"sft: {len(examples)} conversations in {len(data)} rows of {recipe.seq_len + 1} "
                                f"tokens ({data.target_tokens} target tokens), {model.cfg.attn_mode} attention")
    summary = run_sft(model, data, cfg, resume=resume, block_penalty=recipe.block_penalty)
    distributed.export_hf(model, Path(out_dir) / "final")  # consolidated on rank 0 when sharded
    return {**summary, "examples": len(examples)}


def main(argv: list[str]) -> int:
    """`dsv32 sft`: the recipe with the flags applied, from --init-from (or a fresh --preset model); under
    `torchrun --nproc-per-node N -m dsv32 sft ...` data-parallel with FSDP2 (--batch-size is the global batch)."""
    with distributed.session():  # under torchrun: join the process group for this command
        return _main(argv)


def _main(argv: list[str]) -> int:
    from .stages import build_model, parse_overrides

    args, rest = make_parser().parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe {args.recipe!r} is unknown; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[args.recipe]
    changes = {f.name: getattr(args, f.name) for f in fields(Recipe)
               if f.name not in ("domains",) and getattr(args, f.name, None) is not None}
    if args.domains is not None:
        changes["domains"] = parse_domains(args.domains)
    elif args.data:
        changes["domains"] = {}  # distillation data alone unless generated tasks are asked for
    recipe = replace(recipe, **changes)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    ctx = distributed.current()
    model = distributed.parallelize(build_model(args.preset, args.init_from, overrides), ctx,
                                    activation_checkpointing=args.activation_checkpointing,
                                    mp_policy=distributed.bf16_policy() if args.bf16 and ctx.enabled else None)
    summary = run_recipe(model, recipe, args.out, args.data, resume=not args.no_resume, log_every=args.log_every,
                         ckpt_every=args.ckpt_every, bf16=args.bf16)
    distributed.current().print(f"sft: {summary['steps']} steps, final loss {summary['final_loss']:.4f}; model in "
                                f"{Path(args.out) / 'final'}")
    return 0
