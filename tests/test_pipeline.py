"""`dsv32 pipeline` at the micro preset (every stage ran and changed its model, post-training is sparse, the
generated records are verified training-split answers, the report has its parts, reruns skip finished stages,
`--from` redoes the tail), and the Speciale config against the generalist's (rl-distill-anchors.md §6.5 item 16)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv32 import pipeline, presets
from dsv32.cli import main as cli
from dsv32.model import Transformer
from dsv32.rl import tasks as T

CFG = pipeline.micro()
DOMAINS = CFG.specialists["domains"]
MODELS = ["base", *(f"specialist-{d}" for d in DOMAINS), "distilled", "generalist", "speciale"]
# stage -> the stage whose final model it started from
INPUT_OF = {"dsa-warmup": "pretrain", "dsa-sparse": "dsa-warmup", "dense-control": "dsa-warmup", "sft": "dsa-sparse",
            **{f"specialist-{d}": "sft" for d in DOMAINS}, "distill": "sft", "mixed-rl": "distill",
            "speciale": "mixed-rl"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "micro"
    lines = []
    job = pipeline.Pipeline(CFG, out, log=lines.append)
    report = job.run()
    return out, report, lines


def _weights(stage_dir: Path) -> dict:
    return load_file(stage_dir / "final" / "model.safetensors")


def test_every_stage_ran_and_changed_its_model(run):
    out, report, lines = run
    for stage in CFG.stages():
        assert stage in report["timeline"] and report["timeline"][stage] >= 0, stage
    for stage in ("sft", *(f"specialist-{d}" for d in DOMAINS), "generate", "distill", "mixed-rl", "speciale",
                  "eval", "report"):
        assert any(line.startswith("[pipeline") and f"] {stage}: done in" in line for line in lines), stage
    for stage, start in INPUT_OF.items():
        after, before = _weights(out / stage), _weights(out / start)
        assert set(after) == set(before)
        assert any(not torch.equal(after[k], before[k]) for k in after), f"{stage} did not change its model"
    fresh = Transformer(presets.tiny().replace(**CFG.recipe["overrides"]))
    fresh.init_weights(0)
    trained = Transformer.from_pretrained(out / "pretrain" / "final").state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in fresh.state_dict().items())
    for stage in ("sft", "specialist-math", "distill", "mixed-rl", "speciale"):   # post-training stays sparse
        assert json.loads((out / stage / "final" / "config.json").read_text())["dsv32"]["attn_mode"] == "sparse"
    for d in DOMAINS:   # each specialist: its domain SFT from base, then RL from that SFT (both on record)
        stage = report["stages"][f"specialist-{d}"]
        assert stage["sft"]["steps"] == CFG.specialists["sft"]["steps"] and stage["sft"]["examples"] > 0
        assert (out / f"specialist-{d}" / "sft" / "final" / "config.json").is_file()
        assert {"before", "after", "steps"} <= set(stage["rl"])
    assert report["stages"]["speciale"]["sft"]["steps"] == CFG.speciale["sft"]["steps"]


def test_report_holds_eval_timeline_dsa_rl_and_plots(run):
    out, report, _ = run
    assert set(report["eval"]) == set(MODELS)
    for model, by_domain in report["eval"].items():
        assert set(by_domain) == set(DOMAINS), model
        for domain, by_mode in by_domain.items():
            assert set(by_mode) == {"thinking", "non_thinking"}
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in by_mode.values())
    for key in ("recall_stage1", "recall_untrained", "val_loss_dense", "val_loss_sparse", "retrieval", "topk"):
        assert key in report["dsa"], key
    names = {f"specialist-{d}" for d in DOMAINS} | {"generalist-mixed", "speciale"}
    assert names <= set(report["rl"]) and all({"before", "after"} <= set(report["rl"][n]) for n in names)
    assert abs(report["timeline"]["total"] - sum(v for k, v in report["timeline"].items() if k != "total")) < 0.5
    assert set(report["data"]) == set(DOMAINS) and "checks" in report
    assert all(isinstance(c["ok"], bool) for c in report["checks"].values())
    md = (out / "report.md").read_text()
    assert "Held-out accuracy" in md and "| speciale |" in md and "Timeline" in md
    for png in ("timeline.png", "accuracy.png", "lengths.png", "dsa_loss.png", "rl_speciale.png"):
        assert (out / png).stat().st_size > 1000, png


def test_generated_records_are_verified_training_answers(run):
    out, report, _ = run
    gen, weights = CFG.generate, CFG.distill.get("weights", {})
    total = weighted = n_negatives = 0
    for d in DOMAINS:
        train = {t.prompt: t for t in T.make_tasks(d, gen["prompts"], split="train", allow_fewer=True)}
        every = [json.loads(x) for x in (out / "generate" / f"{d}.jsonl").read_text().splitlines()]
        stats = json.loads((out / "generate" / f"{d}.stats.json").read_text())["modes"]
        rows = [r for r in every if not r.get("negative")]
        negatives = [r for r in every if r.get("negative")]   # failed direct replies: block penalty only
        assert len(negatives) == stats["non_thinking"].get("negatives", 0) <= gen["negatives"]
        for row in negatives:
            task = train[row["messages"][0]["content"]]
            assert row["mode"] == "non_thinking" and not T.verify(task, row["messages"][-1]["content"])
        n_negatives += len(negatives)
        assert len(rows) == sum(s["records"] for s in stats.values()) == sum(report["data"][d][m]["records"]
                                                                             for m in stats)
        for row in rows:
            assert {"messages", "reasoning_content", "mode", "domain", "source_model", "verifier_scores"} <= set(row)
            task = train[row["messages"][0]["content"]]           # a training prompt, never a held-out one
            assert row["domain"] == d and row["source_model"] == f"specialist-{d}"
            assert T.verify(task, row["messages"][-1]["content"])
            if row["mode"] == "non_thinking":
                assert row["reasoning_content"] is None
            elif {**gen, **gen.get("by_domain", {}).get(d, {})}.get("check_reasoning", True):
                assert T.reasoning_ok(task, row["reasoning_content"])   # right step by step, not only at the end
        keys = [(r["mode"], r["messages"][0]["content"]) for r in rows]
        assert len(keys) == len(set(keys))                          # deduplicated
        total += len(rows)
        weighted += len(every) * weights.get(d, 1)
    assert total > 0 and report["stages"]["distill"]["examples"] == weighted   # each domain's records x its weight
    assert n_negatives > 0 and report["stages"]["distill"]["modes"]["negative"] > 0


def test_rerun_skips_finished_stages_and_from_redoes_the_tail(run):
    out, report, _ = run
    lines = []
    again = pipeline.Pipeline(CFG, out, log=lines.append).run()
    # one line for the DSA recipe's four stages, one for every later stage
    assert sum("skipped" in line for line in lines) == 1 + len(CFG.stages()) - len(pipeline.RECIPE_STAGES)
    assert again["eval"] == report["eval"] and again["timeline"]["sft"] == report["timeline"]["sft"]
    before = _weights(out / "speciale")
    lines.clear()
    job = pipeline.Pipeline(CFG, out, log=lines.append)
    job.redo_from("speciale")
    job.run()
    redone = [line for line in lines if "done in" in line]
    assert [line.split("] ")[1].split(":")[0] for line in redone] == ["speciale", "eval", "report"]
    assert set(_weights(out / "speciale")) == set(before)


def test_speciale_config_differs_from_the_generalist_as_specified():
    p = pipeline.tiny()
    gen, spec = pipeline.mixed_config(p), pipeline.speciale_config(p)
    assert set(gen.domains) == set(p.specialists["domains"]) and set(spec.domains) == {"math"}
    assert (spec.length_budget or spec.max_tokens) > (gen.length_budget or gen.max_tokens)
    spec_w = spec.rubric.get("math", spec.rubric.get("*"))["length"]
    assert 0 < spec_w < gen.rubric["math"]["length"]
    assert spec.beta("math") == 0.0 and spec.loss.beta == 0.0 and gen.loss.beta > 0
    assert spec.thinking is True and gen.thinking == "both"
    with pytest.raises(ValueError, match="larger length budget"):
        pipeline.speciale_config(p.replace(**{"speciale.rl.max_tokens": 16, "speciale.rl.length_budget": 16}))


def test_speciale_traces_check_every_step_back_to_the_first_number():
    from dsv32.train.sft import task_examples

    for difficulty in (1, 2, 3):
        for task in T.make_tasks("math", 20, difficulty=difficulty):
            *lines, so = T.checked_solution(task).split("\n")
            forward = task.solution.split("\n")
            assert lines[:len(forward)] == forward and len(lines) == 2 * len(forward) and so == f"so {task.answer}"
            for line in lines:   # every line is true arithmetic
                expr, value = line.split("=")
                assert T.evaluate(expr)[0] == int(value), line
            assert lines[-1].split("=")[1] == forward[0].split("+")[0].split("-")[0].split("*")[0]
            plain = T.task_messages(task, thinking=True)
            assert plain[-1]["reasoning_content"] == task.solution   # the default traces are unchanged
    assert T.checked_solution(T.make_tasks("logic", 1)[0]) is None
    plain, checked = (task_examples({"math": 1}, 8, [True, False], check=c) for c in (False, True))
    assert all(len(c.ids) > len(p.ids) for c, p in zip(checked, plain) if c.thinking)
    assert all(c.ids == p.ids for c, p in zip(checked, plain) if not c.thinking)


def test_reasoning_block_check_holds_each_model_to_the_domains_it_serves():
    from dsv32.report import checks

    def det(**clean):   # domain -> share of clean non-thinking replies (1.0 where not given)
        return {d: {"thinking": {"mean_length": 10.0}, "non_thinking": {"no_reasoning_block": clean.get(d, 1.0)}}
                for d in ("math", "tool")}

    details = {"base": det(), "specialist-math": det(tool=0.5), "distilled": det(), "generalist": det(),
               "speciale": det(tool=0.9)}
    c = checks({}, details, ["math", "tool"], None)["non_thinking_has_no_reasoning_block"]
    assert c["ok"] and c["domains"]["specialist-math"] == ["math"] and c["domains"]["generalist"] == ["math", "tool"]
    assert c["any_domain"]["specialist-math"] == 0.5   # reported, not held against it: off its domain
    assert "speciale" not in c["by_model"] and c["any_domain"]["speciale"] == 0.9   # thinking only: reported
    for model, bad in (("generalist", {"tool": 0.99}), ("base", {"math": 0.98}), ("specialist-math", {"math": 0.9}),
                       ("distilled", {"tool": 0.97})):
        c = checks({}, {**details, model: det(**bad)}, ["math", "tool"], None)["non_thinking_has_no_reasoning_block"]
        assert not c["ok"] and c["by_model"][model] < 1.0, model


def test_bad_configs_name_the_problem(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown section 'sfft'"):
        pipeline.tiny().replace(**{"sfft.steps": 3})
    with pytest.raises(ValueError, match="unknown pipeline preset"):
        pipeline.get("huge")
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.Pipeline(CFG, tmp_path).redo_from("dessert")
    assert cli(["pipeline", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown pipeline preset 'huge'" in capsys.readouterr().err



def test_eval_scope_checks_scores_what_every_check_reads(tmp_path):
    from dsv32.report import checks

    tiny = pipeline.tiny()
    domains = tiny.specialists["domains"]
    full = pipeline.Pipeline(tiny.replace(**{"eval.scope": "all"}), tmp_path / "a").eval_plan()
    plan = pipeline.Pipeline(tiny, tmp_path / "b").eval_plan()
    assert tiny.eval["scope"] == "checks" and full == {m: domains for m in MODELS}
    assert plan["base"] == plan["generalist"] == domains and plan["speciale"] == ["math"] and "distilled" not in plan
    assert all(plan[f"specialist-{d}"] == [d] for d in domains)

    def fake(p):   # every planned (model, domain) scored, both modes
        acc = {m: {d: {"thinking": 0.5, "non_thinking": 0.4} for d in ds} for m, ds in p.items()}
        det = {m: {d: {"thinking": {"mean_length": 9.0}, "non_thinking": {"no_reasoning_block": 1.0}} for d in ds}
               for m, ds in p.items()}
        return checks(acc, det, domains, 20.0)

    assert set(fake(plan)) == set(fake(full))   # no check goes missing with the smaller plan
    with pytest.raises(ValueError, match="eval.scope='some'"):
        pipeline.Pipeline(tiny.replace(**{"eval.scope": "some"}), tmp_path / "c").eval_plan()


def test_tiny_math_specialist_trains_on_every_math_prompt_once():
    from dsv32.train.sft import Recipe, task_examples

    sft = {**pipeline.tiny().specialists["sft"], **pipeline.tiny().specialists["by_domain"]["math"]["sft"]}
    pool = T.make_tasks("math", 10 * sft["tasks_per_domain"], split="train", allow_fewer=True)
    assert sft["tasks_per_domain"] == len(pool)   # the whole training split: past the knee, no prompt repeated
    examples = task_examples({"math": 1}, sft["tasks_per_domain"], [True, False])
    assert len(examples) == 2 * len(pool) and len({tuple(e.ids) for e in examples}) == len(examples)
    assert Recipe(**sft).steps > pipeline.tiny().specialists["sft"]["steps"]


def test_tiny_specialists_and_math_data_cover_their_training_prompts():
    """The knees (issue 7): tool trains longer over distinct prompts, alignment over its whole training split, and
    the distillation's math rows come from every math prompt the math specialist learned from."""
    from dsv32.train.sft import task_examples

    tiny = pipeline.tiny()
    sp = tiny.specialists

    def sft(domain):
        return {**sp["sft"], **sp["by_domain"][domain].get("sft", {})}

    tool, align, math = sft("tool"), sft("alignment"), sft("math")
    assert tool["steps"] > sp["sft"]["steps"]
    examples = task_examples({"tool": 1}, tool["tasks_per_domain"], [True])
    assert len({tuple(e.ids) for e in examples}) == tool["tasks_per_domain"]   # no tool prompt repeated
    assert align["tasks_per_domain"] == len(T.make_tasks("alignment", 10 ** 4, split="train", allow_fewer=True))
    assert tiny.generate["by_domain"]["math"]["prompts"] == math["tasks_per_domain"]
