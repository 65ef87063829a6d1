"""The generation engine: cached, ragged, continuously batched decoding equals a full forward; Keep
Sampling Mask and Keep Routing replay through the model; seeds, stops, finish reasons, scoring."""

import pytest
import torch
from conftest import make_config, scale_weights

from dsv32 import Trace, Transformer
from dsv32.data.tokenizer import ByteTokenizer
from dsv32.serve import Engine, SamplingParams, logprobs_over_kept

MODES = ["dense", "sparse"]
LENS = (3, 17, 9, 30, 5, 12)  # up to 30 + 12 generated > topk 8: sparse rows in sparse mode


def build(mode: str, dtype=torch.float32, scaled: bool = True) -> Transformer:
    model = Transformer(make_config())
    if scaled:
        scale_weights(model, std=0.2)
    return model.eval().set_attn_mode(mode).to(dtype)


def prompts(lens=LENS, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lens]


def full_logprobs(model, prompt, tokens, temperature=1.0, routes=None, kept=None):
    """The trainer's view: one full forward over prompt + completion[:-1]."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(ids, routes=None if routes is None else [None if r is None else r[None] for r in routes])
    return logprobs_over_kept(logits[0, len(prompt) - 1:], torch.tensor(tokens), kept, temperature)


@pytest.mark.parametrize("mode", MODES)
def test_batched_decode_with_joins_and_leaves_equals_full_forward(mode):
    """6 prompts of different lengths through 3 rows: requests finish at different steps (max_tokens
    differ) and waiting ones take their rows mid-batch; every token's log-prob matches a full forward."""
    model = build(mode)
    ps = prompts()
    params = [SamplingParams(temperature=1.0, max_tokens=m, logprobs=True, seed=i)
              for i, m in enumerate((12, 4, 9, 12, 6, 10))]
    engine = Engine(model, max_batch=3)
    ids = [engine.add_request(p, sp) for p, sp in zip(ps[:2], params[:2])]
    joined_while_running, done = [], {}
    for step in range(200):
        if step == 2:  # two more join a running batch of two
            ids += [engine.add_request(p, sp) for p, sp in zip(ps[2:4], params[2:4])]
        if step == 5:
            ids += [engine.add_request(p, sp) for p, sp in zip(ps[4:], params[4:])]
        running_before = {r.rid for r in engine.running}
        events = engine.step()
        fresh = {e.request_id for e in events} - running_before
        if fresh and running_before:
            joined_while_running.append(fresh)
        done.update({e.request_id: e.completion for e in events if e.completion is not None})
        if len(done) == len(ps) and not engine.has_work():
            break
    assert len(joined_while_running) >= 2  # the continuous-batching path really ran
    for rid, p, sp in zip(ids, ps, params):
        c = done[rid]
        assert len(c.token_ids) == sp.max_tokens and c.finish_reason == "length" and c.truncated
        want = full_logprobs(model, p, c.token_ids)
        assert (torch.tensor(c.logprobs) - want).abs().max() < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_greedy_batch_equals_greedy_alone(mode):
    model = build(mode)
    ps = prompts()
    batched = Engine(model, max_batch=4).generate(ps, SamplingParams(temperature=0, max_tokens=10))
    for p, c in zip(ps, batched):
        alone = Engine(model, max_batch=1).generate([p], SamplingParams(temperature=0, max_tokens=10))[0]
        assert c.token_ids == alone.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids[:-1]]))[0, len(p) - 1:]
        assert logits.argmax(-1).tolist() == c.token_ids


@pytest.mark.parametrize("mode", MODES)
def test_keep_sampling_mask_and_routing_replay_give_ratio_one(mode):
    """RL's first step: the trainer's full forward, with the sampler's routes and kept sets replayed,
    reproduces the sampler's log-probs (ratio 1 within 1e-6, fp64); without the kept sets it does not."""
    model = build(mode, torch.float64, scaled=False)
    ps = prompts()
    sp = SamplingParams(temperature=0.7, top_p=0.8, max_tokens=12, logprobs=True, return_kept=True,
                        return_routes=True, seed=5)
    outs = Engine(model, max_batch=3).generate(ps, sp)
    for p, c in zip(ps, outs):
        assert len(c.kept) == len(c.token_ids)
        mask = c.kept.mask()
        assert (mask.sum(-1) < model.cfg.vocab_size).all()  # top-p really truncated
        assert all(r is None or r.shape[0] == len(p) + len(c.token_ids) - 1 for r in c.routes)
        sampler = torch.tensor(c.logprobs, dtype=torch.float64)
        replayed = full_logprobs(model, p, c.token_ids, 0.7, routes=c.routes, kept=mask)
        assert ((replayed - sampler).exp() - 1).abs().max() < 1e-6
        naive = full_logprobs(model, p, c.token_ids, 0.7, routes=c.routes)
        assert ((naive - sampler).exp() - 1).abs().min() > 1e-2


def test_routes_equal_the_full_forward_routes():
    model = build("sparse")
    ps = prompts()
    outs = Engine(model, max_batch=4).generate(ps, SamplingParams(max_tokens=8, return_routes=True, seed=0))
    for p, c in zip(ps, outs):
        tr = Trace()
        with torch.no_grad():
            model(torch.tensor([p + c.token_ids[:-1]]), trace=tr)
        assert c.routes[0] is None  # the dense-MLP layer
        for got, want in zip(c.routes[1:], tr.routes[1:]):
            assert torch.equal(got, want[0])


def test_seeded_sampling_is_reproducible():
    model = build("sparse")
    ps = prompts()
    sp = [SamplingParams(max_tokens=15, seed=100 + i) for i in range(len(ps))]
    a = Engine(model, max_batch=6).generate(ps, sp)
    b = Engine(model, max_batch=2).generate(ps, sp)  # other batch compositions, same seeds
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    c = Engine(model, max_batch=6).generate(ps, [SamplingParams(max_tokens=15, seed=7)] * len(ps))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_stop_strings():
    model = build("dense")
    tok = ByteTokenizer()
    engine = Engine(model, max_batch=2, decode=tok.decode)
    p = prompts()[1]
    free = engine.generate([p], SamplingParams(max_tokens=30, seed=3))[0]
    text = tok.decode(free.token_ids)
    stop = text[10:12]
    first = next(g for g in range(1, 31) if stop in tok.decode(free.token_ids[:g]))
    out = engine.generate([p], SamplingParams(max_tokens=30, seed=3, stop=(stop, "never-generated")))[0]
    assert out.finish_reason == "stop" and not out.truncated and out.stop_reason == stop
    assert out.token_ids == free.token_ids[:first]


def test_finish_reasons_and_truncation():
    model = build("sparse")
    p = prompts()[3]
    free = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=12))[0]
    assert (free.finish_reason, free.truncated, len(free.token_ids)) == ("length", True, 12)
    eos = free.token_ids[4]
    k = free.token_ids.index(eos)
    out = Engine(model, eos_id=eos).generate([p], SamplingParams(temperature=0, max_tokens=12))[0]
    assert (out.finish_reason, out.truncated, out.stop_reason) == ("stop", False, eos)
    assert out.token_ids == free.token_ids[: k + 1]  # the stop token is part of the completion
    out = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(eos,)))[0]
    assert out.token_ids == free.token_ids[: k + 1] and out.finish_reason == "stop"
    limited = Engine(model, max_len=len(p) + 5).generate([p], SamplingParams(temperature=0, max_tokens=12))[0]
    assert (limited.finish_reason, limited.truncated, limited.token_ids) == ("length", True, free.token_ids[:5])


def test_bad_requests_raise_and_engine_keeps_working():
    model = build("dense")
    engine = Engine(model, max_len=20)
    for prompt, match in (([], "empty prompt"), (list(range(20)), "shorten the prompt"), ([1, 500], "vocabulary")):
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, SamplingParams())
    with pytest.raises(ValueError, match="decode function"):
        engine.add_request([1, 2], SamplingParams(stop=("x",)))
    assert not engine.has_work()
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].token_ids) == 3


def test_abort_frees_the_row():
    model = build("dense")
    engine = Engine(model, max_batch=2)
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, seed=0))
    b = engine.add_request([4, 5], SamplingParams(max_tokens=6, seed=1))
    engine.step()
    engine.step()
    partial = engine.abort(a)
    assert partial.finish_reason == "abort" and len(partial.token_ids) == 2
    assert [r.rid for r in engine.running] == [b]
    with pytest.raises(ValueError, match="running"):
        engine.release()
    done = [e.completion for _ in range(10) for e in engine.step() if e.completion is not None]
    assert len(done) == 1 and done[0].request_id == b and len(done[0].token_ids) == 6
    engine.release()
    assert engine.cache is None and len(engine.generate([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_engine_sees_in_place_weight_updates():
    model = build("dense")
    engine = Engine(model)
    p = prompts()[2]
    before = engine.generate([p], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    with torch.no_grad():
        model.head.weight.mul_(-1)  # what an optimizer step does: in place
    after = engine.generate([p], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    with torch.no_grad():
        assert model(torch.tensor([p]))[0, -1].argmax().item() == after[0] != before[0]


@pytest.mark.parametrize("mode", MODES)
def test_score_equals_full_forward_log_softmax(mode):
    model = build(mode)
    seqs = prompts(lens=(20, 7, 33))
    prompt_lens = [5, 1, 20]
    got = Engine(model, max_batch=2).score(seqs, prompt_lens)
    for s, p, g in zip(seqs, prompt_lens, got):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([s]))[0], -1)
        want = lp[p - 1:-1].gather(1, torch.tensor(s[p:])[:, None]).squeeze(1)
        assert g.shape == (len(s) - p,) and (g - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="prompt_len"):
        Engine(model).score([[1, 2]], [3])


@pytest.mark.parametrize("mode", MODES)
def test_ragged_cache_multi_token_decode_and_resize(mode):
    """The model-level mechanism under the engine: rows at different lengths take T new tokens each at
    their own positions (a view of some rows, a resized copy) and match each row's full forward."""
    model = build(mode)
    seqs = prompts(lens=(30, 30, 30))
    starts = [4, 19, 11]
    cache = model.new_cache(4, 24)  # 4 rows, only 3 used; too short, resized below
    with torch.no_grad():
        for b, s in enumerate(starts):  # prefill each row alone through a one-row view
            model(torch.tensor([seqs[b][:s]]), cache=cache.rows(b, b + 1))
        cache = cache.resized(40)
        lengths, outs = list(starts), [[] for _ in seqs]
        for n_new in (3, 1, 5):
            view = cache.rows(0, 3, lengths=lengths)
            x = torch.tensor([seq[n:n + n_new] for seq, n in zip(seqs, lengths)])
            logits = model(x, cache=view)
            assert view.lengths == [n + n_new for n in lengths]
            for b in range(3):
                outs[b].append(logits[b])
            lengths = view.lengths
        for b, s in enumerate(starts):
            full = model(torch.tensor([seqs[b][: lengths[b]]]))[0, s:]
            assert (torch.cat(outs[b]) - full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="doc_ids"):
        model(x, cache=cache.rows(0, 3, lengths=lengths), doc_ids=torch.zeros_like(x))


def test_bench_serve_writes_json_and_markdown(tmp_path):
    import json

    from dsv32.serve import bench

    assert bench.main(["--preset", "tiny", "--batches", "1,2", "--contexts", "8,70", "--steps", "1", "--warmup", "0",
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serve.json").read_text())
    cells = {(r["mode"], r["context"], r["batch"]) for r in data["results"]}
    assert cells == {(m, c, b) for m in MODES for c in (8, 70) for b in (1, 2)}
    assert all(r["decode_tok_s"] > 0 and r["prefill_s"] > 0 for r in data["results"])
    assert data["meta"]["topk"] == 64  # the long context (70) exceeds it: sparse attention selects
    md = (tmp_path / "serve.md").read_text()
    assert "| sparse | 70 |" in md and "sparse/dense b2" in md
    with pytest.raises(ValueError, match="--batches"):
        bench.main(["--batches", "1,x", "--out", str(tmp_path)])


def test_fp8_index_key_cache_through_the_engine():
    model = Transformer(make_config(**{"indexer.quant": "fp8_sim", "indexer.cache_fp8": True}))
    model = scale_weights(model, std=0.2).eval().set_attn_mode("sparse")
    ps = prompts()
    outs = Engine(model, max_batch=3).generate(ps, SamplingParams(max_tokens=12, logprobs=True, seed=1))
    for p, c in zip(ps, outs):
        assert (torch.tensor(c.logprobs) - full_logprobs(model, p, c.token_ids)).abs().max() < 1e-4


def test_banned_tokens_are_never_generated_and_the_engine_counts_what_the_ban_changed():
    model = build("sparse", torch.float64, scaled=False)
    ps = prompts()
    free = Engine(model, max_batch=3).generate(ps, SamplingParams(temperature=0, max_tokens=6))
    assert all(c.banned_argmax == 0 for c in free)
    first = sorted({c.token_ids[0] for c in free})
    sp = SamplingParams(temperature=0.9, max_tokens=6, logprobs=True, seed=3).banning(first)
    outs = Engine(model, max_batch=3).generate(ps, sp)
    for p, c, f in zip(ps, outs, free):
        assert not set(c.token_ids) & set(first) and c.banned_argmax >= 1   # its greedy first token was banned
        replayed = full_logprobs(model, p, c.token_ids, 0.9, kept=c.kept.mask())
        assert ((replayed - torch.tensor(c.logprobs, dtype=torch.float64)).exp() - 1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="banned_token_ids"):
        Engine(model).add_request([1, 2], SamplingParams(banned_token_ids=(model.cfg.vocab_size,)))
