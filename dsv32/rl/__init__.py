"""GRPO post-training (rl-distill-anchors.md §1–3, §6): advantages, the loss with V3.2's stability fixes,
rewards and the rubric, the divergence guard, and the `dsv32 rl` trainer. Each file holds one idea:

    advantages.py  group-relative advantages by uid (group mean, std, RLOO)
    loss.py        clipped surrogate, unbiased KL, off-policy sequence masking, aggregations
    rewards.py     reward functions (pure; None = not applicable)      rubric.py  weighted sum per domain
    guard.py       divergence guard: evaluation, detectors, rollback   trainer.py  the GRPO loop
    presets.py     RL run presets (tiny-math, tiny-tool, tiny-hack)     tasks.py    verifiable task suites
"""
