"""Post-training under torchrun on CPU: two gloo processes (spawned as torchrun starts them) against one.

- SFT: the loss (global token mean + indexer KL, sparse) and its gradients on two ranks equal one process on
  the whole batch, although the ranks' rows hold different numbers of target tokens; `dsv32 sft` on two
  ranks stops, resumes from its DCP checkpoint and matches the one-process run step for step;
  `dsv32 distill train` (SFT + one on-policy step with a replica engine) runs on two ranks and writes one
  consolidated `final/`; `dsv32 rl` with the guard rolls back on both ranks together.
- RL: `DistributedGRPOTrainer` on two ranks (one prompt group each, a stop and a resume) ends with the same
  weights on both ranks, equal to the one-process run over the same groups, and the rollout replicas hold
  the policy's weights after the last update; minibatches agree across ranks.

Everything the two ranks do runs in one launch (`_worker`, a module-scoped fixture).
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config
from dsv32 import distributed as D
from dsv32.cli import main as cli
from dsv32.model import Transformer
from dsv32.rl import tasks as T
from dsv32.rl.distributed import DistributedGRPOTrainer
from dsv32.rl.presets import get
from dsv32.train import sft
from test_distributed import _spawn

pytestmark = pytest.mark.usefixtures("one_thread")


def _micro() -> Transformer:
    torch.manual_seed(0)
    return Transformer(make_config(vocab_size=288, n_layers=2))


SFT_ARGS = ["--recipe", "micro", "--domains", "math,logic", "--tasks-per-domain", "4", "--seq-len", "256",
            "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2"]


def _sft_batch() -> tuple[dict, list[str]]:
    """Four packed rows of math and logic conversations: the rows hold different numbers of target tokens."""
    data = sft.SFTData(sft.task_examples({"math": 1, "logic": 1}, 4, [True, False]), 128, seed=0)
    return data.batch(torch.arange(4)), data.domains


def _sft_grads(ctx) -> dict:
    """Sparse attention: the loss is the token mean of the LM loss plus the indexer KL (a mean per row)."""
    model = _micro().set_attn_mode("sparse")
    if ctx.enabled:
        D.parallelize(model, ctx)
    batch, domains = _sft_batch()
    loss, _ = sft.make_loss(domains)(model, ctx.shard(batch))
    loss.backward()
    grads = {n: (p.grad.full_tensor() if ctx.enabled else p.grad) for n, p in model.named_parameters()
             if p.grad is not None}
    return {"loss": ctx.mean({"loss": loss.item()})["loss"], "grads": grads}


def _rl_cfg(**kw):
    base = dict(prompts_per_step=2, group_size=3, max_tokens=8, eval_n=2, steps=2, thinking=False, minibatches=1,
                rubric={"*": {"length_judge": 1.0, "format": 0.1}}, n_train_tasks=20, ckpt_every=1, warmup_steps=0,
                lr=1e-2, ema=0.0)
    return get("tiny-math").replace(**{**base, **kw})


def _rl_run(out: Path, stop_after: int | None = None):
    """Two GRPO steps; with `stop_after`, a first trainer stops there and a second one resumes to the end. With
    an EMA of the policy (tracked from the replica, saved with the DCP checkpoint), which becomes the policy."""
    if stop_after is not None:
        first = DistributedGRPOTrainer(_micro(), _rl_cfg(steps=stop_after, ema=0.5), out)
        first.train(progress=False)
        first.metrics.close()
    trainer = DistributedGRPOTrainer(_micro(), _rl_cfg(ema=0.5), out)
    summary = trainer.train(progress=False)
    trainer.metrics.close()
    return trainer, summary


def _worker(ctx, out: Path) -> None:
    # Logs whose keys differ between ranks (a domain present in one rank's rows only) still combine.
    got = {"mean": ctx.mean({"loss": float(ctx.rank), f"only{ctx.rank}": 1.0 + ctx.rank}),
           "sft_grads": _sft_grads(ctx)}

    # `dsv32 sft` on two ranks: 2 steps, then resumed to 3.
    init, ac = str(out / "init"), "--activation-checkpointing"  # recomputation changes nothing but memory
    assert cli(["sft", *SFT_ARGS, ac, "--init-from", init, "--steps", "2", "--out", str(out / "sft")]) == 0
    assert cli(["sft", *SFT_ARGS, ac, "--init-from", init, "--steps", "3", "--out", str(out / "sft")]) == 0

    # `dsv32 distill train`: SFT on records, then one on-policy step (the student samples through a replica).
    assert cli(["distill", "train", "--init-from", init, "--data", str(out / "records.jsonl"), "--out",
                str(out / "distill"), "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--on-policy-steps",
                "1", "--teacher", f"math={init}"]) == 0

    # RL: minibatches agree across ranks (slices empty on one rank, and one empty on both).
    trainer = DistributedGRPOTrainer(_micro(), _rl_cfg(minibatches=4), out / "rl-mb")
    samples = [object()] * 3
    order = [0, 1, 2] if ctx.rank == 0 else [2]
    got["minibatches"] = {"chunks": trainer._minibatches(order, samples), "scales": list(trainer._scales)}
    trainer.metrics.close()

    # RL: two steps with a stop and a resume in between.
    trainer, summary = _rl_run(out / "rl", stop_after=1)
    weights = D.full_state_dict(trainer.model)
    replica = trainer.replica.state_dict()
    got["rl"] = {"weights": weights, "summary": {k: summary[k] for k in ("steps", "before", "after")},
                 "replica_is_policy": all(torch.equal(replica[k], v) for k, v in weights.items()),
                 "sharded": D.is_sharded(trainer.model)}

    # `dsv32 rl` with the guard: every completion is cut at 8 tokens, so the clipped-ratio alarm fires and
    # the ranks roll back together (DCP good checkpoints) until the guard stops the run.
    assert cli(["rl", "--init-from", init, "--out", str(out / "rl-cli"), "--steps", "2", "--prompts_per_step=2",
                "--group_size=3", "--max_tokens=8", "--eval_n=2", "--thinking=both", "--n_train_tasks=20",
                '--rubric={"*": {"length_judge": 1.0}}', "--guard.eval_every=1", "--guard.eval_subset=2",
                "--guard.clipped_ratio_max=0.5", "--guard.warmup=1", "--guard.max_rollbacks=1"]) == 0
    torch.save(got, out / f"rank{ctx.rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("post")
    _micro().save_pretrained(out / "init")
    tasks = T.make_tasks("math", 4, split="train", seed=0)
    with open(out / "records.jsonl", "w") as f:
        for i, task in enumerate(tasks):
            thinking = i % 2 == 0
            f.write(json.dumps({"messages": T.task_messages(task, thinking=thinking), "domain": "math",
                                "mode": "thinking" if thinking else "non_thinking"}) + "\n")
    _spawn(_worker, out)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_sft_token_weighted_loss_and_grads_equal_one_process(two_ranks):
    _, (got, other) = two_ranks
    assert got["mean"] == other["mean"] == {"loss": 0.5, "only0": 1.0, "only1": 2.0}
    batch, _ = _sft_batch()
    targets = (batch["labels"] != -100).sum(1)
    assert targets[:2].sum() != targets[2:].sum()  # the ranks' halves weigh differently: a plain mean would differ
    ref = _sft_grads(D.current())
    assert got["sft_grads"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert set(got["sft_grads"]["grads"]) == set(ref["grads"])
    assert any(".indexer." in n for n in ref["grads"])  # the KL reached the indexer: sparse attention ran
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["sft_grads"]["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_sft_command_on_two_ranks_resumes_and_matches_one_process(two_ranks, tmp_path):
    out, _ = two_ranks
    two = out / "sft"
    assert cli(["sft", *SFT_ARGS, "--init-from", str(out / "init"), "--steps", "3", "--out", str(tmp_path)]) == 0
    records = (two / "metrics.jsonl").read_text().splitlines()
    assert sum("resumed_from" in r for r in records) == 1 and len(_losses(two)) == 3  # rank 0 wrote, once
    assert D.checkpoint.is_dcp(two / "step_00000003")
    assert _losses(two) == pytest.approx(_losses(tmp_path), rel=1e-4)
    one, exported = Transformer.from_pretrained(tmp_path / "final"), Transformer.from_pretrained(two / "final")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, one.state_dict()[k], rtol=1e-3, atol=1e-5, msg=k)


def test_distill_train_on_two_ranks(two_ranks):
    out, _ = two_ranks
    run = out / "distill"
    logged = [json.loads(r) for r in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert D.checkpoint.is_dcp(run / "sft" / "step_00000002") and [r["step"] for r in logged] == [2]
    on_policy = [json.loads(r) for r in (run / "on_policy" / "metrics.jsonl").read_text().splitlines()]
    assert len(on_policy) == 1 and "reverse_kl" in on_policy[0]
    start, final = _micro().state_dict(), Transformer.from_pretrained(run / "final").state_dict()
    assert any(not torch.allclose(final[k], v) for k, v in start.items())  # trained, and exported whole


def test_rl_command_on_two_ranks_rolls_back_together(two_ranks):
    out, _ = two_ranks
    run = out / "rl-cli"
    logged = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_before/accuracy" in r for r in logged) == 1  # rank 0 alone writes
    assert max(r.get("safeguard/rollbacks", 0) for r in logged) == 1
    assert D.checkpoint.is_dcp(run / "good" / "step_00000000") and (run / "report.json").is_file()
    assert sorted(p.name for p in (run / "final").iterdir()) == ["config.json", "model.safetensors"]


def test_rl_minibatches_agree_across_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    # Four slices: {0} {1} {2} {} on rank 0, {2} {} {} {} on rank 1. The last is empty everywhere: dropped by
    # both; the middle two are weight-0 stand-ins on rank 1, and rank 0's weigh double (the global mean).
    assert r0["minibatches"] == {"chunks": [[0], [1], [2]], "scales": [1.0, 2.0, 2.0]}
    assert r1["minibatches"] == {"chunks": [[2], [0], [0]], "scales": [1.0, 0.0, 0.0]}


def test_rl_two_ranks_equal_one_process_and_refresh_replicas(two_ranks, tmp_path):
    _, (r0, r1) = two_ranks
    assert r0["rl"]["sharded"] and r0["rl"]["summary"]["steps"] == 2
    for k, v in r0["rl"]["weights"].items():
        assert torch.equal(v, r1["rl"]["weights"][k]), k  # both ranks hold the same policy
    assert r0["rl"]["replica_is_policy"] and r1["rl"]["replica_is_policy"]  # the engines sample the updated policy
    trainer, summary = _rl_run(tmp_path)  # one process over the same groups (seeded sampling per request)
    assert summary["steps"] == 2
    assert {k: summary[k] for k in ("before", "after")} == {k: r0["rl"]["summary"][k] for k in ("before", "after")}
    start = _micro().state_dict()
    moved = max((trainer.model.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3  # the comparison below is not between two untrained models
    # Adam's first steps normalise this micro run's near-zero gradients, so the reduction-order noise of other batch
    # shapes per rank reaches ~3e-5 in the weights (the non-thinking rows replay kept sets, which shifts it); a
    # wrong gradient or a rank that sampled other tokens moves them by ~1e-2.
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(r0["rl"]["weights"][k], v, rtol=1e-4, atol=1e-4, msg=k)
