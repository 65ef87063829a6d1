"""DeepSeekMoE routing: the gate against a brute-force per-token reference, expert dispatch against a
per-token loop, group-limited top-k, Keep Routing replay, and the fp32 router in a bf16 model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config, scale_weights

from dsv32 import Trace, Transformer
from dsv32.model.config import MoEConfig
from dsv32.model.moe import MoE, Gate

DIM = 16

GATE_CONFIGS = {
    "one_group": dict(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                      norm_topk_prob=True, route_scale=1.0),
    "groups_norm_scaled": dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
                               norm_topk_prob=True, route_scale=2.5),
    "groups_unnormed": dict(n_routed_experts=12, n_expert_groups=3, n_limited_groups=2, n_activated_experts=4,
                            norm_topk_prob=False, route_scale=1.5),
    "one_kept_group": dict(n_routed_experts=16, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2,
                           norm_topk_prob=False, route_scale=0.7),
    "one_group_unnormed": dict(n_routed_experts=6, n_expert_groups=1, n_limited_groups=1, n_activated_experts=3,
                               norm_topk_prob=False, route_scale=1.0),
}


def moe_cfg(**kw) -> MoEConfig:
    return MoEConfig(moe_inter_dim=8, n_shared_experts=kw.pop("n_shared_experts", 1), **kw)


def make_gate(cfg: MoEConfig, seed: int = 0, bias_std: float = 0.3) -> Gate:
    g = torch.Generator().manual_seed(seed)
    gate = Gate(DIM, cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.3)
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * bias_std)
    return gate


def reference_route(x_d: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, c: MoEConfig):
    """One token, plain Python: returns {expert: weight} and the kept groups."""
    E = c.n_routed_experts
    scores = torch.sigmoid(x_d.float() @ W.float().t()).tolist()
    choice = [scores[e] + float(bias[e]) for e in range(E)]
    per = E // c.n_expert_groups
    group_score = []
    for grp in range(c.n_expert_groups):
        vals = sorted(choice[grp * per:(grp + 1) * per], reverse=True)
        group_score.append(sum(vals[:2]) if c.n_expert_groups > 1 else 0.0)
    kept = sorted(range(c.n_expert_groups), key=lambda grp: -group_score[grp])[:c.n_limited_groups]
    candidates = [e for e in range(E) if e // per in kept]
    chosen = sorted(candidates, key=lambda e: -choice[e])[:c.n_activated_experts]
    w = [scores[e] for e in chosen]
    if c.norm_topk_prob:
        total = sum(w)
        w = [v / total for v in w]
    return {e: v * c.route_scale for e, v in zip(chosen, w)}, set(kept)


def as_dicts(weights_Nk: torch.Tensor, route_Nk: torch.Tensor) -> list[dict]:
    return [dict(zip(r, w)) for r, w in zip(route_Nk.tolist(), weights_Nk.tolist())]


@pytest.mark.parametrize("name", list(GATE_CONFIGS))
def test_gate_matches_bruteforce_reference(name):
    cfg = moe_cfg(**GATE_CONFIGS[name])
    gate = make_gate(cfg, seed=1)
    x = torch.randn(96, DIM, generator=torch.Generator().manual_seed(2))
    weights, route = gate(x)
    assert route.shape == (96, cfg.n_activated_experts) and weights.shape == route.shape
    assert weights.dtype == torch.float32
    got = as_dicts(weights, route)
    for n in range(x.shape[0]):
        want, _ = reference_route(x[n], gate.weight, gate.bias, cfg)
        assert len(got[n]) == cfg.n_activated_experts, f"token {n}: duplicate experts {route[n].tolist()}"
        assert got[n].keys() == want.keys(), f"token {n}: experts {sorted(got[n])} vs reference {sorted(want)}"
        for e in want:
            assert got[n][e] == pytest.approx(want[e], rel=1e-5, abs=1e-6), f"token {n}, expert {e}"
        if cfg.norm_topk_prob:
            assert sum(got[n].values()) == pytest.approx(cfg.route_scale, rel=1e-5)

    # Power: the correction bias changes the selection for some token (so the test above checks its use) ...
    no_bias = copy.deepcopy(gate)
    no_bias.bias.zero_()
    _, route0 = no_bias(x)
    changed = [n for n in range(x.shape[0]) if set(route0[n].tolist()) != set(route[n].tolist())]
    assert changed, "the bias never changes the selection: the test cannot tell whether it is applied"
    # ... but never the weights of an expert picked both ways: they are the raw sigmoid scores (unnormalised case).
    if not cfg.norm_topk_prob:
        w0 = as_dicts(*no_bias(x))
        for n in range(x.shape[0]):
            for e in set(w0[n]) & set(got[n]):
                assert w0[n][e] == pytest.approx(got[n][e], rel=1e-6)


@pytest.mark.parametrize("name", ["groups_norm_scaled", "groups_unnormed", "one_kept_group"])
def test_group_limited_topk_stays_in_kept_groups(name):
    cfg = moe_cfg(**GATE_CONFIGS[name])
    gate = make_gate(cfg, seed=3)
    x = torch.randn(128, DIM, generator=torch.Generator().manual_seed(4))
    _, route = gate(x)
    per = cfg.n_routed_experts // cfg.n_expert_groups
    choice = torch.sigmoid(x @ gate.weight.t()) + gate.bias
    unconstrained = choice.topk(cfg.n_activated_experts, dim=-1).indices
    escapes = 0
    for n in range(x.shape[0]):
        _, kept = reference_route(x[n], gate.weight, gate.bias, cfg)
        groups = {e // per for e in route[n].tolist()}
        assert groups <= kept, f"token {n}: experts {route[n].tolist()} outside kept groups {sorted(kept)}"
        assert len(groups) <= cfg.n_limited_groups
        escapes += not {e // per for e in unconstrained[n].tolist()} <= kept
    # Power: without the group limit some tokens would pick an expert outside the kept groups.
    assert escapes > 0


def init_moe(moe: MoE, seed: int = 0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=g) * 0.3)
    return moe


def brute_force_moe(moe: MoE, x_BTd: torch.Tensor, route_BTk: torch.Tensor | None = None) -> torch.Tensor:
    c = moe.gate.cfg
    out = torch.zeros_like(x_BTd)
    B, T, _ = x_BTd.shape
    for b in range(B):
        for t in range(T):
            x = x_BTd[b, t]
            if route_BTk is None:
                experts, _ = reference_route(x, moe.gate.weight, moe.gate.bias, c)
            else:
                ids = route_BTk[b, t].tolist()
                s = torch.sigmoid(x @ moe.gate.weight.t())[ids]
                s = s / s.sum() if c.norm_topk_prob else s
                experts = dict(zip(ids, (s * c.route_scale).tolist()))
            y = torch.zeros_like(x)
            for e, w in experts.items():
                h = F.silu(x @ moe.w1[e].t()) * (x @ moe.w3[e].t())
                y = y + w * (h @ moe.w2[e].t())
            if moe.shared is not None:
                sh = moe.shared
                y = y + (F.silu(x @ sh.w1.weight.t()) * (x @ sh.w3.weight.t())) @ sh.w2.weight.t()
            out[b, t] = y
    return out


@pytest.mark.parametrize("name,n_shared", [("groups_norm_scaled", 1), ("groups_unnormed", 2), ("one_group", 0)])
def test_moe_forward_matches_per_token_loop(name, n_shared):
    cfg = moe_cfg(n_shared_experts=n_shared, **GATE_CONFIGS[name])
    moe = init_moe(MoE(DIM, cfg), seed=5)
    assert (moe.shared is None) == (n_shared == 0)
    x = torch.randn(3, 11, DIM, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y, route = moe(x)
        want = brute_force_moe(moe, x)
    assert route.shape == (3, 11, cfg.n_activated_experts)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert y.abs().max() > 0.1  # non-trivial output
    # Replaying a different route through the module uses exactly those experts.
    other = (route + 1) % cfg.n_routed_experts
    with torch.no_grad():
        y2, route2 = moe(x, other)
        want2 = brute_force_moe(moe, x, other)
    assert torch.equal(route2, other)
    torch.testing.assert_close(y2, want2, atol=1e-5, rtol=1e-5)
    assert (y2 - y).abs().max() > 1e-3


# -- Keep Routing through the whole model ----------------------------------------------------------


@pytest.fixture
def model_and_routes():
    model = scale_weights(Transformer(make_config())).eval()
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    tr = Trace()
    with torch.no_grad():
        logits = model(x, trace=tr)
    return model, x, logits, tr


def test_trace_records_routes_per_layer(model_and_routes):
    model, x, _, tr = model_and_routes
    k, E = model.cfg.moe.n_activated_experts, model.cfg.moe.n_routed_experts
    assert len(tr.routes) == model.cfg.n_layers
    assert tr.routes[0] is None  # the dense-MLP layer
    for r in tr.routes[1:]:
        assert r.shape == (2, 12, k) and r.dtype == torch.int64
        assert int(r.min()) >= 0 and int(r.max()) < E
    assert not torch.equal(tr.routes[1], tr.routes[2])


def test_replay_gives_identical_logits(model_and_routes):
    model, x, logits, tr = model_and_routes
    tr2 = Trace()
    with torch.no_grad():
        replayed = model(x, routes=tr.routes, trace=tr2)
    assert torch.equal(replayed, logits)
    for a, b in zip(tr.routes, tr2.routes):
        assert (a is None and b is None) or torch.equal(a, b)


def test_replaying_different_routes_changes_output(model_and_routes):
    model, x, logits, tr = model_and_routes
    E = model.cfg.moe.n_routed_experts
    rotated = [None if r is None else (r + 1) % E for r in tr.routes]
    tr2 = Trace()
    with torch.no_grad():
        out = model(x, routes=rotated, trace=tr2)
    assert (out - logits).abs().max() > 1e-2
    for want, got in zip(rotated, tr2.routes):
        assert (want is None and got is None) or torch.equal(want, got)


def test_replay_on_perturbed_model_uses_given_experts(model_and_routes):
    model, x, _, tr = model_and_routes
    perturbed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        free_tr, replay_tr = Trace(), Trace()
        free = perturbed(x, trace=free_tr)
        replayed = perturbed(x, routes=tr.routes, trace=replay_tr)
    # Power: left to itself, the perturbed model routes differently somewhere.
    assert any(not torch.equal(a, b) for a, b in zip(tr.routes[1:], free_tr.routes[1:]))
    for want, got in zip(tr.routes, replay_tr.routes):
        assert (want is None and got is None) or torch.equal(want, got)
    assert (free - replayed).abs().max() > 1e-4


def test_gradients_reach_router_under_replay(model_and_routes):
    model, x, _, tr = model_and_routes
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x[:, :-1], routes=[None if r is None else r[:, :-1] for r in tr.routes])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    for layer in model.layers[model.cfg.moe.n_dense_layers:]:
        gate = layer.ffn.gate
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert not gate.bias.requires_grad  # the correction bias is a buffer, not trained by gradients
        assert layer.ffn.w1.grad is not None and layer.ffn.w1.grad.abs().sum() > 0


def test_replay_rejects_wrong_number_of_layers(model_and_routes):
    model, x, _, tr = model_and_routes
    with torch.no_grad(), pytest.raises(ValueError, match="one per layer"):
        model(x, routes=tr.routes[1:])


# -- dtypes --------------------------------------------------------------------------------------------


def test_router_stays_fp32_in_bf16_model():
    model = scale_weights(Transformer(make_config()))
    model.to(torch.bfloat16)
    moe_layers = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    assert len(moe_layers) == 2
    for moe in moe_layers:
        assert moe.gate.weight.dtype == torch.float32
        assert moe.gate.bias.dtype == torch.float32
        assert moe.w1.dtype == torch.bfloat16  # power: the cast did happen elsewhere
    assert model.embed.weight.dtype == torch.bfloat16
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(9))
    for mode in ("dense", "sparse"):
        model.set_attn_mode(mode)
        tr = Trace()
        with torch.no_grad():
            logits = model(x, trace=tr)
        assert logits.dtype == torch.bfloat16 and logits.shape == (2, 20, 97)
        assert torch.isfinite(logits.float()).all()
        assert all(r.shape == (2, 20, 2) for r in tr.routes[1:])
    # .bfloat16() and a round trip back to fp32 go through the same path.
    model.float().bfloat16()
    assert all(m.gate.weight.dtype == torch.float32 and m.gate.bias.dtype == torch.float32 for m in moe_layers)


def test_router_values_survive_bf16_cast():
    model = scale_weights(Transformer(make_config()))
    gate = model.layers[1].ffn.gate
    w, b = gate.weight.detach().clone(), gate.bias.clone()
    model.to(torch.bfloat16)
    assert torch.equal(gate.weight.detach(), w)
    assert torch.equal(gate.bias, b)


def test_indexer_head_weights_survive_bf16_cast():
    model = scale_weights(Transformer(make_config()))
    wp = model.layers[0].attn.indexer.weights_proj.weight
    before = wp.detach().clone()
    model.to(torch.bfloat16)
    assert wp.dtype == torch.float32 and torch.equal(wp.detach(), before)
    assert model.layers[0].attn.indexer.wq_b.weight.dtype == torch.bfloat16
