"""A rubric: reward functions combined with weights per domain into one scalar per completion, with every
component kept for logging (V3.2 §3: "a set of reward models … score an outcome reward R_i"; TRL's
sum_then_normalize: weights apply before the group-relative step; rl-distill-anchors.md §6.5 item 10).

    rubric = Rubric({"math": {"correctness": 1.0, "format": 0.2, "length": 0.1},
                     "*": {"correctness": 1.0, "format": 0.2}})
    total, components = rubric.score(text, task, {"thinking": True, "n_tokens": 40, "max_tokens": 64})

total = Σ_k w_k · R_k over the components that apply (R_k not None); None when none applies (the advantage
module then gives that completion zero advantage). A domain missing from the table uses the "*" row.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from .rewards import REWARDS
from .tasks import Task

RewardFn = Callable[..., "float | None"]


class Rubric:
    def __init__(self, weights_by_domain: dict[str, dict[str, float]], rewards: dict[str, RewardFn] | None = None):
        self.rewards = dict(REWARDS if rewards is None else rewards)
        if not weights_by_domain:
            raise ValueError("Rubric needs at least one domain row, e.g. {'*': {'correctness': 1.0}}")
        for domain, row in weights_by_domain.items():
            unknown = sorted(set(row) - set(self.rewards))
            if unknown:
                raise ValueError(f"Rubric row {domain!r} names unknown rewards {unknown}; known: "
                                 f"{', '.join(sorted(self.rewards))}")
            bad = [k for k, w in row.items() if not isinstance(w, (int, float)) or not math.isfinite(w)]
            if bad:
                raise ValueError(f"Rubric row {domain!r}: weights of {bad} must be finite numbers")
        self.weights = {d: dict(row) for d, row in weights_by_domain.items()}

    def row(self, domain: str) -> dict[str, float]:
        if domain in self.weights:
            return self.weights[domain]
        if "*" in self.weights:
            return self.weights["*"]
        raise ValueError(f"Rubric has no weights for domain {domain!r} and no '*' row; add one of them")

    def score(self, completion_text: str, task: Task, info: dict | None = None) -> tuple[float | None, dict]:
        """(total, {reward name: value or None}) for one completion; only the domain's rewards run."""
        info = info or {}
        components: dict[str, float | None] = {}
        total, applied = 0.0, False
        for name, weight in self.row(task.domain).items():
            value = self.rewards[name](completion_text, task, **info)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"reward {name!r} returned {value} for a {task.domain} task; rewards must be "
                                 "finite floats or None")
            components[name] = value
            if value is not None:
                total += weight * value
                applied = True
        return (total if applied else None), components

    def to_dict(self) -> dict:
        return {"weights": self.weights}


def summarize(results: list[tuple[float | None, dict]], tasks: list[Task]) -> dict[str, float]:
    """Logging names of rl-distill-anchors.md §6.4: `rewards/{component}/{mean,std}` and
    `rewards/{domain}/{component}/mean` over the completions where the component applied."""
    by: dict[str, list[float]] = defaultdict(list)
    for (total, comps), task in zip(results, tasks):
        for name, value in comps.items():
            if value is not None:
                by[name].append(value)
                by[f"{task.domain}/{name}"].append(value)
        if total is not None:
            by[f"{task.domain}/total"].append(total)
    out = {}
    for key, vals in sorted(by.items()):
        mean = sum(vals) / len(vals)
        out[f"rewards/{key}/mean"] = mean
        if "/" not in key:
            out[f"rewards/{key}/std"] = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
    return out
