"""The model on a CUDA GPU: same results as on the CPU, bf16 training and cached decoding run.

Run with `pytest -m gpu` on a machine with CUDA (skipped elsewhere).
"""

import pytest
import torch

from conftest import make_config, scale_weights
from dsv32 import Trace, Transformer, presets

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_cuda_matches_cpu(mode):
    model = scale_weights(Transformer(make_config(attn_mode=mode))).eval()
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        cpu_trace, gpu_trace = Trace(), Trace()
        cpu = model(ids, trace=cpu_trace)
        gpu = model.cuda()(ids.cuda(), trace=gpu_trace).cpu()
    assert (cpu - gpu).abs().max().item() <= 1e-3
    if mode == "sparse":
        for a, b in zip(cpu_trace.topk, gpu_trace.topk):
            same = (a.sort(-1).values == b.cpu().sort(-1).values).all(-1).float().mean().item()
            assert same >= 0.99


def test_cuda_cached_decoding_matches_full_forward():
    model = scale_weights(Transformer(make_config(attn_mode="sparse"))).eval().cuda()
    ids = torch.randint(0, 97, (2, 40), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 40)
        steps = [model(ids[:, :13], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(13, 40)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-3


def test_small_preset_bf16_sparse_train_step():
    cfg = presets.small().replace(n_layers=2, **{"moe.n_dense_layers": 1})
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 4097), device="cuda")
    trace = Trace()
    logits = model.set_attn_mode("sparse")(ids[:, :-1], trace=trace)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert trace.topk[0].shape == (1, 4096, 2048) and (trace.topk[0][0, -1] >= 0).all()
    assert model.layers[0].attn.indexer.weights_proj.weight.dtype == torch.float32
