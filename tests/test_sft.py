"""SFT (dsv32/train/sft.py): masks and packing, distillation records, training lowers the loss, the command."""

import json

import pytest
import torch

from conftest import make_config
from dsv32.cli import main as cli
from dsv32.data.loaders import IGNORE
from dsv32.data.tokenizer import ByteTokenizer
from dsv32.model import Transformer
from dsv32.rl import tasks as T
from dsv32.train import TrainConfig, sft

TOK = ByteTokenizer()


def _model(**kw):
    return Transformer(make_config(vocab_size=272, **kw))


def test_labels_are_exactly_the_assistant_tokens_and_never_cross_conversations():
    tasks = T.make_tasks("math", 6) + T.make_tasks("tool", 2)
    examples = [sft.encode(T.task_messages(t, thinking=th), TOK, thinking=th, tools=T.tools_for(t), domain=t.domain)
                for t in tasks for th in (True, False)]
    data = sft.SFTData(examples, seq_len=600, seed=0)
    assert sum(len(e.ids) for e in examples) == int((data.docs_NL >= 0).sum())  # each packed once, whole
    batch = data.batch(torch.arange(len(data)))
    targets = []
    for r in range(len(data)):
        labels, docs = batch["labels"][r], data.docs_NL[r]
        for seg in range(int(docs.max()) + 1):
            pos = (docs[1:] == seg).nonzero().flatten()
            if seg > 0:  # the first token of a conversation is never a target of the one before
                assert labels[pos[0]] == IGNORE
            targets.append(TOK.decode(labels[pos][labels[pos] != IGNORE].tolist()))
    expected = []
    for t in tasks:
        for th in (True, False):
            if t.domain == "tool":
                first = ("need " + t.meta["calls"][0]["name"] + "</think>") if th else ""
                call = t.meta["calls"][0]
                expected.append(f"{first}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{call['name']}<｜tool▁sep｜>"
                                f"{json.dumps(call['arguments'])}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
                                f"<｜end▁of▁sentence｜>" + (f"so {t.answer}</think>" if th else "")
                                + f"{t.answer}<｜end▁of▁sentence｜>")
            else:
                expected.append((f"{t.solution}</think>" if th else "") + f"{t.answer}<｜end▁of▁sentence｜>")
    assert sorted(targets) == sorted(expected)  # prompts, openers and tool outputs are never targets


def test_data_resumes_at_the_next_batch():
    examples = sft.task_examples({"math": 1}, 60, [True, False])
    a = sft.SFTData(examples, 64, seed=1).stream(3)
    next(a), next(a)
    state = a.state_dict()
    want = next(a)
    b = sft.SFTData(examples, 64, seed=1).stream(3)
    b.load_state_dict(state)
    assert all(torch.equal(want[k], v) for k, v in next(b).items())
    with pytest.raises(ValueError, match="rows"):
        sft.SFTData(examples[:10], 64, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="raise --seq-len"):
        sft.SFTData(examples, 16)


def _masked_loss(model, batch):
    with torch.no_grad():
        return sft.make_loss(["math"])(model, batch)[0].item()


def test_sft_lowers_the_loss_on_its_data(tmp_path):
    torch.manual_seed(0)
    model = _model()
    data = sft.SFTData(sft.task_examples({"math": 1}, 150, [True, False]), 96, seed=0)
    probe = data.batch(torch.arange(8))
    before = _masked_loss(model, probe)
    cfg = TrainConfig(lr=3e-3, steps=40, warmup_steps=5, batch_size=8, seq_len=96, log_every=10, out_dir=str(tmp_path))
    summary = sft.run_sft(model, data, cfg)
    after = _masked_loss(model, probe)
    assert summary["steps"] == 40 and after < before - 1.0, (before, after)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "sft_loss/math" in logged[-1]


def test_sparse_models_train_sparse_with_the_indexer_on_its_kl(tmp_path):
    model = _model().set_attn_mode("sparse")
    data = sft.SFTData(sft.task_examples({"logic": 1}, 20, [True]), 96, seed=0)  # 70+ tokens > top-k 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-3, steps=2, warmup_steps=0, batch_size=2, seq_len=96, log_every=1, out_dir=str(tmp_path))
    sft.run_sft(model, data, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".indexer." in n for n in changed) and any(".indexer." not in n for n in changed)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["indexer_kl"] > 0 and model.cfg.attn_mode == "sparse"


def _record(mode="thinking", **kw):
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    return {"messages": msgs, "reasoning_content": "2+3=5", "mode": mode, "domain": "math", "source_model": "m",
            "verifier_scores": {"correct": 1.0}, **kw}


def test_distillation_records(tmp_path):
    path = tmp_path / "d.jsonl"
    tool_msgs = T.task_messages(T.make_tasks("tool", 1)[0], thinking=False)
    path.write_text("\n".join(json.dumps(r) for r in (_record(), _record("non_thinking"),
                                                      _record("non_thinking", messages=tool_msgs))) + "\n")
    rows = sft.read_records(path)
    think, plain, tool = (sft.record_example(r, TOK) for r in rows)
    target = lambda e: TOK.decode([i for i, m in zip(e.ids, e.mask) if m])  # noqa: E731
    assert target(think) == "2+3=5</think>5<｜end▁of▁sentence｜>" and think.thinking
    assert target(plain) == "5<｜end▁of▁sentence｜>" and not plain.thinking
    assert "## Tools" not in TOK.decode(tool.ids) and sum(tool.mask) > 0  # tools not described (tasks.py)
    described = sft.record_example({**rows[2], "tools": [T.TOOLS["calc"]]}, TOK)
    assert '{"name": "calc", "description"' in TOK.decode(described.ids)
    cases = {"{bad": "d.jsonl:2: invalid JSON", json.dumps({"messages": []}): "d.jsonl:2: 'messages' must be",
             json.dumps(_record(mode="fast")): "d.jsonl:2: mode 'fast'",
             json.dumps({"messages": [{"role": "user", "content": "x"}]}): "d.jsonl:2: no assistant message"}
    for line, msg in cases.items():
        path.write_text(json.dumps(_record()) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=msg):
            sft.read_records(path)


def test_sft_command_trains_from_records_and_writes_final(tmp_path):
    init = tmp_path / "init"
    _model().save_pretrained(init)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(_record(m)) for m in ("thinking", "non_thinking")) + "\n")
    out = tmp_path / "run"
    assert cli(["sft", "--init-from", str(init), "--data", str(data), "--domains", "math", "--tasks-per-domain", "4",
                "--steps", "2", "--batch-size", "1", "--seq-len", "64", "--out", str(out)]) == 0
    assert (out / "final" / "config.json").is_file()
    assert Transformer.from_pretrained(out / "final").cfg.vocab_size == 272
    assert cli(["sft", "--init-from", str(init), "--domains", "chess", "--out", str(out)]) == 2
    assert cli(["sft", "--init-from", str(init), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2


def test_parse_domains():
    assert sft.parse_domains("math:3, tool") == {"math": 3, "tool": 1}
    with pytest.raises(ValueError, match="weight"):
        sft.parse_domains("math:0")


def test_micro_recipe_covers_every_domain_and_writes_final(tmp_path):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = sft.run_recipe(model, sft.RECIPES["micro"], tmp_path)
    assert summary["steps"] == 4 and summary["examples"] == 2 * 4 * sum(sft.RECIPES["micro"].domains.values())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert (tmp_path / "final" / "config.json").is_file()
    assert set(sft.RECIPES["tiny"].domains) == set(T.DOMAINS)


def test_block_penalty_is_the_unlikelihood_of_a_reasoning_block_in_non_thinking_replies():
    torch.manual_seed(0)
    model = _model()
    data = sft.SFTData(sft.task_examples({"math": 1, "logic": 1}, 6, [True, False]), 200, seed=0)
    batch = data.batch(torch.arange(len(data)))
    assert batch["non_thinking"].any() and (~batch["non_thinking"] & (batch["labels"] != IGNORE)).any()
    plain, _ = sft.make_loss(data.domains)(model, batch)
    penalised, extras = sft.make_loss(data.domains, block_penalty=0.5)(model, batch)
    # by hand: the probability of <think> or </think> at the non-thinking target positions
    probs = torch.softmax(model(batch["input_ids"], doc_ids=batch["doc_ids"]).float(), -1)
    sel = (batch["labels"] != IGNORE) & batch["non_thinking"]
    p = probs[sel][:, [TOK.token_id("<think>"), TOK.token_id("</think>")]].sum(-1)
    assert torch.allclose(penalised - plain, 0.5 * -torch.log1p(-p).mean(), rtol=1e-4)
    assert abs(extras["non_thinking_block_p"] - p.mean().item()) < 1e-5
    # its gradient lowers that probability (thinking positions are left alone)
    penalty = penalised - plain
    grads = torch.autograd.grad(penalty, [q for q in model.parameters() if q.requires_grad], allow_unused=True)
    with torch.no_grad():
        for q, g in zip([q for q in model.parameters() if q.requires_grad], grads):
            if g is not None:
                q -= 0.5 * g
    after = torch.softmax(model(batch["input_ids"], doc_ids=batch["doc_ids"]).float(), -1)
    assert after[sel][:, [TOK.token_id("<think>"), TOK.token_id("</think>")]].sum(-1).mean() < p.mean()


def test_negative_examples_get_only_the_block_penalty():
    torch.manual_seed(0)
    model = _model()
    examples = sft.task_examples({"math": 1, "logic": 1}, 6, [True, False])
    for e in examples[1::4]:
        e.learn = e.thinking = False   # negatives are non-thinking
    data = sft.SFTData(examples, 200, seed=0)
    batch = data.batch(torch.arange(len(data)))
    assert (~batch["learn"] & (batch["labels"] != IGNORE)).any()
    plain, _ = sft.make_loss(data.domains)(model, batch)
    penalised, _ = sft.make_loss(data.domains, block_penalty=1.0)(model, batch)
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                           reduction="none").view_as(batch["labels"])
    learn = (batch["labels"] != IGNORE) & batch["learn"]
    assert torch.allclose(plain, ce[learn].mean(), rtol=1e-4)          # no cross-entropy on negatives
    direct = (batch["labels"] != IGNORE) & batch["non_thinking"]      # the penalty: every non-thinking target
    p = torch.softmax(logits, -1)[direct][:, [TOK.token_id("<think>"), TOK.token_id("</think>")]].sum(-1)
    assert torch.allclose(penalised - plain, -torch.log1p(-p).mean(), rtol=1e-4)
    assert data.target_tokens == int(((data.mask_NL & data.learn_NL)).sum()) < int(data.mask_NL.sum())


def test_recipe_block_penalty_reaches_the_loss(tmp_path):
    recipe = sft.Recipe(domains={"math": 1}, tasks_per_domain=4, steps=2, batch_size=2, seq_len=200, warmup_steps=1,
                        block_penalty=1.0)
    sft.run_recipe(_model(), recipe, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("non_thinking_block_p" in r for r in rows)


def test_check_share_gives_that_share_of_checked_math_traces():
    """`Recipe.check` as a share: that many tasks' thinking traces end with their self-check, spread evenly; the
    non-thinking replies and the other tasks keep their plain form."""
    import pytest

    from dsv32.train.sft import task_examples

    plain, full, half = (task_examples({"math": 1}, 40, [True, False], check=c) for c in (0.0, 1.0, 0.5))
    longer = [h.thinking and len(h.ids) > len(p.ids) for h, p in zip(half, plain)]
    assert sum(longer) == 20 and not any(longer[:2]) and longer[2]   # task 0 plain, task 1 checked (ids 2, 3)
    assert all(h.ids == (f.ids if lo else p.ids) for h, f, p, lo in zip(half, full, plain, longer) if h.thinking)
    assert all(h.ids == p.ids for h, p in zip(half, plain) if not h.thinking)
    with pytest.raises(ValueError, match="share of checked"):
        task_examples({"math": 1}, 4, [True], check=1.5)
