"""Specialists -> dual-mode data -> one generalist (DeepSeek-V3.2 §4, rl-distill-anchors.md §1.1, §4, §6.1 items 9–11).

    specialists.py  GRPO per domain from the SFT'd sparse model, in thinking and non-thinking mode
    generate.py     `dsv32 distill generate`: best-of-N verified answers of a specialist -> JSONL records
    train.py        `dsv32 distill train`: SFT of one generalist on the union; optional on-policy reverse KL
"""
