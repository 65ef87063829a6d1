"""The tiny preset learns in both attention modes; the CLI answers."""

import subprocess
import sys

import torch

from dsv32 import Transformer, presets
from dsv32 import demo


def test_tiny_loss_falls_in_both_modes():
    data = torch.tensor(list(demo.stdlib_text()[:200_000]), dtype=torch.long)
    for mode in ("dense", "sparse"):  # 160 tokens > top-k 64: the sparse path runs
        torch.manual_seed(0)
        model = Transformer(presets.tiny()).set_attn_mode(mode)
        gen = torch.Generator().manual_seed(0)
        losses = demo.train(model, demo.batches(data, 4, 160, gen), steps=20, lr=3e-3, log_every=100)
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < first - 1.0, f"{mode}: loss did not fall ({first:.3f} -> {last:.3f})"


def test_cli_presets_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsv32", "presets"], capture_output=True, text=True, check=True)
    assert "tiny" in out.stdout and "671.9B" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dsv32", "info", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no config.json" in bad.stderr and "Traceback" not in bad.stderr
