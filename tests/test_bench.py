"""`dsv32 bench attention` at tiny lengths on the CPU: the files, the records, the table. No timing assertions."""

import json
import math

import pytest

from dsv32 import cli, presets
from dsv32.bench import costs

REQUIRED = {"length", "topk", "phase", "batch", "impl", "ms", "peak_mb", "device"}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "attention", "--preset", "tiny", "--lengths", "128,256", "--topk", "64", "--repeats", "1",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


def test_bench_writes_json_markdown_and_plot(bench_out):
    assert (bench_out / "attention.json").is_file()
    assert (bench_out / "attention.md").is_file()
    pytest.importorskip("matplotlib")
    png = bench_out / "attention.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_records(bench_out):
    records = json.loads((bench_out / "attention.json").read_text())
    assert isinstance(records, list) and records
    seen = set()
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["phase"] in ("prefill", "train", "decode")
        assert r["impl"] in ("dense", "dsa", "hf")
        assert r["device"] == "cpu" and r["length"] in (128, 256) and r["topk"] == 64
        assert r["batch"] in ((1, 8) if r["phase"] == "decode" else (1,))
        assert r["flop_ratio_bound"] > 0 and r["bound_kind"] == ("bytes" if r["phase"] == "decode" else "flops")
        if r["skipped"]:
            assert r["reason"] and not r["reason"].startswith("error"), r["reason"]
        else:
            assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["peak_mb"] >= 0, r
            assert r["cpu_ms"] is None or r["cpu_ms"] > 0, r  # None: the one run was the memory-tracked one
        seen.add((r["phase"], r["impl"], r["length"], r["batch"]))
    for phase, batches in (("prefill", (1,)), ("train", (1,)), ("decode", (1, 8))):
        for impl in ("dense", "dsa", "hf"):
            for L in (128, 256):
                for B in batches:
                    assert (phase, impl, L, B) in seen, (phase, impl, L, B)
    # At these sizes everything fits: nothing is skipped, and DSA really ran its sparse path (L > k).
    assert not [r for r in records if r["skipped"]]
    assert all("sparse" in r["path"] for r in records if r["impl"] == "dsa")


def test_bench_markdown_has_ratio_columns(bench_out):
    md = (bench_out / "attention.md").read_text()
    for phase in ("prefill", "train", "decode"):
        assert f"## {phase}" in md
    header = next(line for line in md.splitlines() if line.startswith("| L |"))
    assert "dense/dsa" in header and "CPU time" in header and "bound attn" in header and "bound layer" in header
    rows = [line for line in md.splitlines() if line.startswith("| 128 |") or line.startswith("| 256 |")]
    assert len(rows) == 2 + 2 + 4  # prefill, train: 2 lengths; decode: 2 lengths x 2 batches
    assert all("×" in row for row in rows)


def test_bounds_match_the_spec_formulas():
    # V3 proportions: an absorbed-mode pair costs 1088/320 = 3.4x an MHA-mode pair.
    v3 = costs.Shapes.of(presets.v32())
    assert v3.c == pytest.approx(3.4)
    small = presets.small()
    s = costs.Shapes.of(small)
    L, k = 65536, 2048
    b = costs.bounds(small, "prefill", L, k, 1)
    assert b["attn"] == pytest.approx((L / 2) / (k * s.c), rel=0.02)  # ≈ (L/2)/(k·c)
    assert b["layer"] < b["attn"]  # the indexer and the projections only lower the ceiling
    d = costs.bounds(small, "decode", L, k, 1)  # bytes: L·(R+P) against L·d_I + k·(R+P)
    R_P, DI = small.mla.kv_lora_rank + small.mla.qk_rope_head_dim, small.indexer.head_dim
    assert d["attn"] == pytest.approx((L + 1) * R_P / ((L + 1) * DI + k * R_P))
    assert costs.bounds(small, "prefill", 2048, 2048, 1) == {"attn": 1.0, "layer": 1.0, "kind": "flops"}


def test_bench_rejects_bad_arguments(capsys):
    assert cli.main(["bench", "attention", "--impls", "dense,flash", "--device", "cpu"]) == 2
    assert "flash" in capsys.readouterr().err
