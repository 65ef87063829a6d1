"""Incremental decoding equals one full forward (dsa-anchors.md §7.1 item 9, §7.4 item 3).

Prefill from 0, chunked prefill at odd offsets, single-token and multi-token decode must all give the
same logits (to fp32 tolerance) and the same top-k key SETS per layer as a single full-sequence pass,
in dense and sparse attention, with and without packed documents, with a bf16/fp32 or FP8 index-key cache.
"""

import pytest
import torch
from conftest import make_config, scale_weights

from dsv32 import Trace, Transformer

B, T = 2, 40  # T well above indexer.topk=8, so most rows are genuinely sparse
TOPK = 8
ATOL = 1e-4


def build(mode: str, **overrides) -> Transformer:
    model = scale_weights(Transformer(make_config(**overrides))).eval()
    return model.set_attn_mode(mode)


def tokens(seed: int = 1, batch: int = B, length: int = T) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def doc_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    out = []
    for lens in rows:
        out.append(torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lens)]))
    return torch.stack(out)


def doc_starts(doc_ids: torch.Tensor | None, batch: int, length: int) -> list[list[int]]:
    """ks[b][t]: first position of t's document, computed by a plain loop (independent of the model)."""
    ks = []
    for b in range(batch):
        row, start = [], 0
        for t in range(length):
            if doc_ids is not None and t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
                start = t
            row.append(start)
        ks.append(row)
    return ks


def row_sets(topk_BTK: torch.Tensor | None, t0: int, T_chunk: int, ks: list[list[int]]) -> dict:
    """{(b, absolute t): frozenset of selected keys}. A dense layer (None) attends to all of [ks, t]."""
    rows = None if topk_BTK is None else topk_BTK.tolist()
    out = {}
    for b in range(len(ks)):
        for j in range(T_chunk):
            t = t0 + j
            if rows is None:
                out[(b, t)] = frozenset(range(ks[b][t], t + 1))
            else:
                out[(b, t)] = frozenset(i for i in rows[b][j] if i >= 0)
    return out


def full_forward(model, x, doc_ids=None):
    tr = Trace()
    with torch.no_grad():
        logits = model(x, doc_ids=doc_ids, trace=tr)
    return logits, tr


def incremental(model, x, chunks, doc_ids=None, max_len=None):
    """Run x through a cache in the given chunk sizes; returns (logits [B, T, V], [(start, len, Trace)])."""
    assert sum(chunks) == x.shape[1]
    cache = model.new_cache(x.shape[0], max_len or x.shape[1])
    outs, traces, start = [], [], 0
    with torch.no_grad():
        for n in chunks:
            tr = Trace()
            d = None if doc_ids is None else doc_ids[:, start:start + n]
            outs.append(model(x[:, start:start + n], cache=cache, doc_ids=d, trace=tr))
            traces.append((start, n, tr))
            start += n
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1), traces, cache


def check_equivalent(model, x, chunks, doc_ids=None):
    """Asserts logits and per-layer top-k sets of the chunked run equal the full forward's."""
    n_layers = model.cfg.n_layers
    full, tr_full = full_forward(model, x, doc_ids)
    inc, traces, _ = incremental(model, x, chunks, doc_ids)
    assert torch.isfinite(full).all()
    diff = (inc - full).abs().max().item()
    assert diff <= ATOL, f"chunks {chunks}: logits differ by {diff}"

    ks = doc_starts(doc_ids, x.shape[0], x.shape[1])
    sparse = model.cfg.attn_mode == "sparse"
    assert len(tr_full.topk) == n_layers
    n_sparse_rows = 0
    for layer in range(n_layers):
        want = row_sets(tr_full.topk[layer], 0, x.shape[1], ks)
        got = {}
        for start, n, tr in traces:
            assert len(tr.topk) == n_layers
            got.update(row_sets(tr.topk[layer], start, n, ks))
        assert got.keys() == want.keys()
        bad = [key for key in want if want[key] != got[key]]
        assert not bad, (f"layer {layer}, chunks {chunks}: top-k sets differ at (b, t) = {bad[:5]}: "
                         f"full {sorted(want[bad[0]])} vs incremental {sorted(got[bad[0]])}")
        for (b, t), s in want.items():
            visible = t + 1 - ks[b][t]
            assert len(s) == (min(TOPK, visible) if sparse else visible)  # |S_t| = min(k, visible) ...
            assert all(ks[b][t] <= i <= t for i in s)  # ... causal and inside the document
            n_sparse_rows += visible > TOPK
    return full, tr_full, n_sparse_rows


def assert_really_sparse(model, tr_full, n_sparse_rows):
    """Power: in sparse mode top-k actually drops keys, and not just by recency."""
    if model.cfg.attn_mode == "dense":
        assert all(t is None for t in tr_full.topk)
        return
    assert all(t is not None and t.dtype == torch.int64 for t in tr_full.topk)
    assert n_sparse_rows > 0
    not_window = 0
    for idx in tr_full.topk:
        for b, rows in enumerate(idx.tolist()):
            for t in range(TOPK, len(rows)):
                s = {i for i in rows[t] if i >= 0}
                not_window += s != set(range(t + 1 - TOPK, t + 1))
    assert not_window > 0, "every selection is the most recent window: the indexer is not doing anything"


MODES = ["dense", "sparse"]


@pytest.mark.parametrize("mode", MODES)
def test_prefill_then_single_token_decode(mode):
    model = build(mode)
    x = tokens()
    _, tr_full, n_sparse = check_equivalent(model, x, [5] + [1] * (T - 5))
    assert_really_sparse(model, tr_full, n_sparse)


@pytest.mark.parametrize("mode", MODES)
def test_prefill_longer_than_topk_then_decode(mode):
    # The prefill itself is sparse here (20 > topk), unlike the test above.
    model = build(mode)
    check_equivalent(model, tokens(seed=2), [20] + [1] * (T - 20))


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_at_odd_offsets(mode):
    model = build(mode)
    x = tokens(seed=3)
    _, tr_full, n_sparse = check_equivalent(model, x, [7, 13, 1, 19])
    assert_really_sparse(model, tr_full, n_sparse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step", [2, 4])
def test_multi_token_decode(mode, step):
    model = build(mode)
    x = tokens(seed=4)
    check_equivalent(model, x, [11] + [step] * (28 // step) + [1])  # 11 + 28 + 1 = T


# Packed documents: row 0 has a 3-token tail document, row 1 a document that starts mid-chunk.
DOCS = [[12, 25, 3], [9, 31]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunks", [[7, 13, 1, 19], [10] + [1] * 30, [14, 2, 2, 4, 4, 4, 2, 4, 4]])
def test_documents_match_full_forward(mode, chunks):
    model = build(mode)
    x = tokens(seed=5)
    doc_ids = doc_ids_from_lengths(DOCS)
    full, tr_full, n_sparse = check_equivalent(model, x, chunks, doc_ids)
    assert_really_sparse(model, tr_full, n_sparse)
    # Power: the documents change the result (the doc boundary is honoured, not ignored).
    plain, _ = full_forward(model, x)
    assert (plain[:, 13:] - full[:, 13:]).abs().max() > 1e-2


@pytest.mark.parametrize("chunks", [[5] + [1] * 35, [7, 13, 1, 19], [12, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2]])
def test_fp8_index_key_cache(chunks):
    model = build("sparse", **{"indexer.quant": "fp8_sim", "indexer.cache_fp8": True})
    x = tokens(seed=6)
    _, tr_full, n_sparse = check_equivalent(model, x, chunks)
    assert_really_sparse(model, tr_full, n_sparse)
    _, _, cache = incremental(model, x, [T])
    for layer in cache.layers:
        assert layer.index_k.dtype == torch.float8_e4m3fn
        assert layer.index_scale is not None and layer.index_scale.dtype == torch.float32
        assert layer.index_k.float().abs().max() > 0  # keys were actually written


def test_fp8_index_key_cache_with_documents():
    model = build("sparse", **{"indexer.quant": "fp8_sim", "indexer.cache_fp8": True})
    check_equivalent(model, tokens(seed=7), [7, 13, 1, 19], doc_ids_from_lengths(DOCS))


def test_cache_overflow_raises_and_leaves_cache_usable():
    model = build("sparse")
    x = tokens(seed=8, length=12)
    cache = model.new_cache(B, 12)
    with torch.no_grad():
        first = model(x[:, :10], cache=cache)
        with pytest.raises(ValueError, match=r"max_len=12") as err:
            model(x[:, 10:12].repeat(1, 2), cache=cache)  # 10 cached + 4 new > 12
        assert "new_cache" in str(err.value)  # says how to fix it
        assert cache.length == 10  # the failed call did not advance the cache
        rest = model(x[:, 10:12], cache=cache)
        with pytest.raises(ValueError, match=r"max_len"):
            model(x[:, :1], cache=cache)  # full: even one more token overflows
    with torch.no_grad():
        full = model(x)
    assert (torch.cat([first, rest], 1) - full).abs().max() <= ATOL


def test_cache_batch_mismatch_raises():
    model = build("dense")
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"batch size 3 .*batch size 2"):
            model(tokens(batch=3, length=4), cache=cache)
        assert cache.length == 0
        model(tokens(batch=2, length=4), cache=cache)  # the right batch still works
    assert cache.length == 4


def test_cache_batch_mismatch_message_says_what_to_do():
    model = build("dense")
    cache = model.new_cache(2, 16)
    with torch.no_grad(), pytest.raises(ValueError) as err:
        model(tokens(batch=3, length=4), cache=cache)
    assert "new_cache" in str(err.value)


def test_new_cache_longer_than_max_seq_len_raises():
    model = build("dense")
    limit = model.cfg.max_seq_len
    model.new_cache(1, limit)  # exactly the limit is fine
    with pytest.raises(ValueError, match=rf"max_len={limit + 1}.*max_seq_len={limit}"):
        model.new_cache(1, limit + 1)
