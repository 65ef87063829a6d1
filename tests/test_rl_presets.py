"""The issue-6 RL setup: presets, the SFT base recipe they start from, and sampling inside the tokenizer's
vocabulary (the tiny embedding is larger than the byte vocabulary)."""

import torch

from dsv32.data.tokenizer import ByteTokenizer
from dsv32.model import Transformer
from dsv32.rl import presets
from dsv32.rl import tasks as T
from dsv32.rl.rollout import collate, rollout
from dsv32.rl.trainer import GRPOTrainer, policy_logprobs
from dsv32.train import sft

from conftest import make_config, scale_weights

TOK = ByteTokenizer()


def test_every_preset_builds_and_the_bar_presets_fit_ten_minutes():
    for name in presets.PRESETS:
        cfg = presets.get(name)
        assert cfg.name == name
    for name in ("tiny-math", "tiny-tool"):
        cfg = presets.get(name)
        assert 0 < cfg.minutes <= 10, f"{name}: the acceptance run is at most 10 minutes"
        assert cfg.eval_n >= 200, f"{name}: held-out accuracy needs at least 200 problems"
    hack = presets.get("tiny-hack")
    assert hack.guard is not None and hack.guard_demo


def test_rl_base_recipes_are_thinking_mode_and_fit_their_rows():
    for name, domains in (("tiny-rl", {"math"}), ("tiny-rl-tool", {"math", "tool"})):
        recipe = sft.RECIPES[name]
        examples = sft.build_examples(recipe)
        assert {e.domain for e in examples} == domains
        assert all(e.thinking for e in examples)
        assert max(len(e.ids) for e in examples) <= recipe.seq_len + 1
        data = sft.SFTData(examples, recipe.seq_len, recipe.seed)
        assert len(data) >= recipe.batch_size


def test_rl_train_prompts_never_appear_in_the_heldout_set():
    for domain in ("math", "tool"):
        train = {t.prompt for t in T.make_tasks(domain, 1000, split="train", allow_fewer=True)}
        held = {t.prompt for t in T.make_tasks(domain, 200, split="heldout", seed=1000, allow_fewer=True)}
        assert held and not train & held


def test_trainer_samples_inside_the_tokenizer_vocabulary_and_matches_the_sampler(tmp_path):
    """A model whose head favours ids >= 272 (outside the byte vocabulary) must still sample decodable ids, and
    the training log-probs must be renormalised over the same ids as the sampler's (on-policy mismatch ~ 0)."""
    torch.manual_seed(0)
    model = scale_weights(Transformer(make_config(vocab_size=320, n_layers=2)), std=0.2)
    with torch.no_grad():
        model.head.weight[TOK.vocab_size:] *= 5.0   # make the out-of-vocabulary rows loud
    cfg = presets.get("tiny-math").replace(prompts_per_step=2, group_size=3, max_tokens=8, eval_n=2, steps=1,
                                           n_train_tasks=4, thinking=False)
    trainer = GRPOTrainer(model, cfg, tmp_path)
    samples = rollout(trainer.engine, TOK, T.make_tasks("math", 2), group_size=3, params=trainer.sampling,
                      thinking=False)
    generated = [i for s in samples for i, m in zip(s.ids, s.gen_mask) if m]
    assert generated and max(generated) < TOK.vocab_size
    batch = {**collate(samples, model.cfg.vocab_size, "cpu", cfg.temperature), "vocab_limit": trainer.vocab_limit}
    with torch.no_grad():
        lp, _ = policy_logprobs(model, batch)
        full, _ = policy_logprobs(model, {**batch, "vocab_limit": None})
    mask = batch["mask"].bool()
    assert torch.allclose(lp[mask], batch["sampler_logps"][mask], atol=1e-4)
    assert (full[mask] < lp[mask] - 1e-3).any(), "over the whole embedding the log-probs would not match"
