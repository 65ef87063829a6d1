"""Rewards and the rubric (rl-distill-anchors.md §6.5 items 8 and 10), plus the docstring examples."""

import doctest
import math

import pytest

from dsv32.rl import rewards
from dsv32.rl.advantages import group_advantages
from dsv32.rl.rewards import (alignment_rules, correctness, format_reward, language_consistency, length_judge,
                              length_penalty, soft_overlong, tool_success)
from dsv32.rl.rubric import Rubric, summarize
from dsv32.rl.tasks import REFUSAL, Task, make_tasks

EOS = "<｜end▁of▁sentence｜>"


def test_docstring_examples():
    result = doctest.testmod(rewards, verbose=False)
    assert result.attempted >= 10 and result.failed == 0


def test_correctness_per_domain_on_generated_tasks():
    for domain in ("math", "countdown", "logic", "tool"):
        for task in make_tasks(domain, 5, split="heldout", seed=1):
            right = f"{task.solution}</think>{task.answer}{EOS}"
            assert correctness(right, task) == 1.0, (domain, task)
            assert correctness(f"{task.solution}</think>nonsense{EOS}", task) == 0.0
            assert correctness(f"</think>{task.answer}{EOS}", task, thinking=True) == 1.0
            assert correctness(f"{task.answer}{EOS}", task, thinking=False) == 1.0
    assert correctness(f"</think>{REFUSAL}{EOS}", make_tasks("alignment", 1)[0]) is None


def test_math_correctness_uses_math_verify_forms():
    task = Task("What is 1/2?", "1/2", "math")
    assert correctness(f"</think>0.5{EOS}", task) == 1.0
    assert correctness(f"</think>\\frac{{1}}{{2}}{EOS}", task) == 1.0
    assert correctness(f"</think>0.25{EOS}", task) == 0.0
    assert correctness(f"0.5</think>{EOS}", task) == 0.0          # the number in the reasoning is not the answer


def test_truncated_completions_are_never_well_formed_nor_correct():
    task = make_tasks("math", 1)[0]
    full = f"{task.solution}</think>{task.answer}{EOS}"
    assert format_reward(full, task) == 1.0
    cut = full[:-len(EOS)]                                        # no EOS: the sampler hit max_tokens
    assert format_reward(cut, task) == 0.0
    assert format_reward(full, task, truncated=True) == 0.0
    assert correctness(full, task, truncated=True) == 0.0
    assert length_penalty(full, task, n_tokens=64, max_tokens=64, truncated=True) == -1.0
    assert format_reward(f"{task.solution}{EOS}", task) == 0.0    # reasoning never closed


def test_soft_overlong_penalty_shape_and_relaxed_budget():
    assert [soft_overlong(n, 100, 20) for n in (0, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    task = Task("q", "a", "math")
    strict = length_penalty("x", task, n_tokens=90, max_tokens=100)
    relaxed = length_penalty("x", task, n_tokens=90, max_tokens=100, length_budget=200)
    assert strict < 0 and relaxed == 0.0
    assert length_penalty("x", task) is None
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong(10, 10, 0)


def test_language_consistency_counts_target_words():
    task = Task("q", "5", "math")
    assert language_consistency(f"add 2 and 3</think>5{EOS}", task) == 1.0
    assert language_consistency(f"\ufffd\ufffd 2</think>5{EOS}", task) == pytest.approx(2 / 3)
    assert language_consistency(f"</think>{EOS}", task) is None
    with pytest.raises(ValueError, match="language"):
        language_consistency("x", Task("q", "5", "math", {"language": "xx"}))


def test_tool_success_needs_a_working_call_and_a_right_answer():
    task = next(t for t in make_tasks("tool", 10, seed=2) if t.meta["calls"][0]["name"] == "calc")
    good = [{"role": "assistant", "content": ""}, {"role": "tool", "content": task.answer}]
    bad = [{"role": "assistant", "content": ""}, {"role": "tool", "content": "error: not an arithmetic expression"}]
    final = f"</think>{task.answer}{EOS}"
    assert tool_success(final, task, transcript=good) == 1.0
    assert tool_success(final, task, transcript=bad) == 0.0
    assert tool_success(f"</think>0{EOS}", task, transcript=good) == 0.0
    assert tool_success(final, make_tasks("math", 1)[0]) is None


def test_alignment_rules_refuse_and_format():
    tasks = make_tasks("alignment", 40, seed=3)
    for t in tasks:
        assert alignment_rules(f"{t.answer}{EOS}", t, thinking=False) == 1.0
    refuse = next(t for t in tasks if t.meta["rule"] == "refuse")
    help_ = next(t for t in tasks if t.meta["rule"] == "help")
    upper = next(t for t in tasks if t.meta["rule"] == "upper")
    assert alignment_rules(f"Sure, here is how.{EOS}", refuse, thinking=False) == 0.0
    assert alignment_rules(f"{REFUSAL}{EOS}", help_, thinking=False) == 0.0     # over-refusal fails too
    assert alignment_rules(f"{upper.meta['text']}{EOS}", upper, thinking=False) == 0.0
    assert alignment_rules(f"x{EOS}", make_tasks("math", 1)[0]) is None


def test_length_judge_is_hackable():
    task = make_tasks("math", 1)[0]
    right = f"</think>{task.answer}{EOS}"
    padded = f"</think>{task.answer} and that is my final answer, trust me{EOS}"
    assert length_judge(padded, task) > length_judge(right, task)
    assert correctness(padded, task) <= correctness(right, task)


# ---------------------------------------------------------------- rubric (§6.5 item 10)

def test_rubric_weights_per_domain_and_components():
    rubric = Rubric({"math": {"correctness": 1.0, "format": 0.5, "length": 0.2},
                     "*": {"correctness": 1.0, "alignment": 1.0}})
    math_task = Task("What is 2+3?", "5", "math")
    total, comps = rubric.score(f"2+3=5</think>5{EOS}", math_task, {"n_tokens": 60, "max_tokens": 64})
    assert comps == {"correctness": 1.0, "format": 1.0, "length": pytest.approx(-0.75)}
    assert total == pytest.approx(1.0 + 0.5 - 0.2 * 0.75)
    al = next(t for t in make_tasks("alignment", 20) if t.meta["rule"] == "refuse")
    total, comps = rubric.score(f"{REFUSAL}{EOS}", al, {"thinking": False})
    assert comps == {"correctness": None, "alignment": 1.0} and total == 1.0


def test_rubric_none_when_nothing_applies_gives_zero_advantage():
    rubric = Rubric({"*": {"tool": 1.0}})
    task = Task("What is 2+3?", "5", "math")                     # no tools: the tool reward does not apply
    results = [rubric.score(f"</think>{x}{EOS}", task) for x in ("5", "6")]
    assert [r[0] for r in results] == [None, None]
    adv, stats = group_advantages([r[0] for r in results], ["g", "g"])
    assert adv.tolist() == [0.0, 0.0] and stats["frac_reward_none"] == 1.0


def test_summarize_logs_every_component_per_domain():
    rubric = Rubric({"*": {"correctness": 1.0, "format": 0.1}})
    tasks = make_tasks("math", 2) + make_tasks("logic", 2)
    texts = [f"</think>{t.answer}{EOS}" for t in tasks[:3]] + ["</think>wrong"]
    stats = summarize([rubric.score(x, t) for x, t in zip(texts, tasks)], tasks)
    assert stats["rewards/correctness/mean"] == 0.75 and stats["rewards/format/mean"] == 0.75
    assert stats["rewards/math/correctness/mean"] == 1.0 and stats["rewards/logic/correctness/mean"] == 0.5
    assert "rewards/correctness/std" in stats and "rewards/logic/total/mean" in stats


def test_rubric_rejects_unknown_rewards_domains_and_bad_values():
    with pytest.raises(ValueError, match="unknown rewards"):
        Rubric({"math": {"corectness": 1.0}})
    with pytest.raises(ValueError, match="no weights for domain"):
        Rubric({"math": {"correctness": 1.0}}).score("x", Task("q", "a", "logic"))
    with pytest.raises(ValueError, match="finite"):
        Rubric({"*": {"nan": 1.0}}, rewards={"nan": lambda text, task, **kw: math.nan}).score("x", Task("q", "a", "m"))


def test_tool_grounding_rewards_answers_read_off_a_tool_output():
    from dsv32.rl.rewards import tool_grounding

    task = next(t for t in make_tasks("tool", 20, seed=4) if t.meta["calls"][0]["name"] == "lookup")
    out = [{"role": "tool", "content": task.meta["outputs"][0]}]
    assert tool_grounding(f"</think>{task.answer}{EOS}", task, transcript=out) == 1.0
    assert tool_grounding(f"</think>zzz{EOS}", task, transcript=out) == 0.0
    assert tool_grounding(f"</think>{task.answer}{EOS}", task, transcript=[]) == 0.0      # no tool was read
    assert tool_grounding(f"</think>{task.answer}", task, transcript=out, truncated=True) == 0.0
    assert tool_grounding(f"</think>5{EOS}", make_tasks("math", 1)[0]) is None


def test_self_verification_rewards_a_right_answer_with_a_right_self_check():
    """DeepSeekMath-V2's term at byte scale: only a right answer whose reasoning undoes every step of its own
    chain back to the first number scores; Speciale's rubric then ranks a checked right reply above a plain one."""
    from dsv32.rl.presets import tiny_mixed, tiny_speciale
    from dsv32.rl.rewards import self_verification
    from dsv32.rl.tasks import checked_solution

    tasks = [t for t in make_tasks("math", 40, split="heldout", seed=3) if checked_solution(t)][:10]
    assert len(tasks) >= 5
    rubric = Rubric(tiny_speciale().rubric)
    for t in tasks:
        checked, plain = checked_solution(t), t.solution
        good = f"{checked}</think>{t.answer}{EOS}"
        assert self_verification(good, t) == 1.0
        assert self_verification(f"{plain}</think>{t.answer}{EOS}", t) == 0.0                # not checked
        assert self_verification(f"{checked}</think>{int(t.answer) + 1}{EOS}", t) == 0.0      # wrong answer
        assert self_verification(good, t, truncated=True) == 0.0
        lines = checked.split("\n")
        a, _, rest = lines[-2].partition("=")                                                  # last undo step
        wrong_check = "\n".join([*lines[:-2], f"{a}={int(rest) + 1}", lines[-1]])
        assert self_verification(f"{wrong_check}</think>{t.answer}{EOS}", t) == 0.0
        assert self_verification(f"</think>{t.answer}{EOS}", t, thinking=False) is None
        info = {"thinking": True, "n_tokens": 30, "max_tokens": 128}
        assert rubric.score(good, t, info)[0] > rubric.score(f"{plain}</think>{t.answer}{EOS}", t, info)[0]
    assert self_verification("x", make_tasks("logic", 1)[0]) is None
    assert all("self_verification" not in w for w in tiny_mixed().rubric.values())   # Speciale's term only
