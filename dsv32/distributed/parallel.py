"""Process groups and FSDP2, applied to a built model from outside the model code (torchtitan's layout).

    ctx = distributed.init()                     # under torchrun: a process group (NCCL on GPU, gloo on CPU)
    model = distributed.parallelize(model, ctx)  # to ctx.device; rank 0's weights everywhere; FSDP2 if world > 1
    batch = ctx.shard(next(batches))             # this rank's rows of the global batch

`init` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the run is one process and
every helper here is a no-op, so single-process training does exactly what it did before. The active
context is process-global (`current()`): the training loop, the stages and later trainers consult it
instead of reading rank globals, and the model never sees it.

Data parallelism averages gradients over ranks (FSDP's reduce-scatter), so W ranks with B/W rows each
take the same steps as one process accumulating gradients over W micro-batches of B/W rows (up to float
rounding). Each rank's loss is a mean over its own tokens, so this equals one process with B rows only
when every slice holds the same number of target tokens.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. World size 1 (the default) means: not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes metrics and writes consolidated files."""
        return self.rank == 0

    def shard(self, batch: dict) -> dict:
        """This rank's contiguous slice of every tensor in a global batch (dim 0); other values as they are."""
        if not self.enabled:
            return batch
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.shape[0] % self.world_size:
                    raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows, which {self.world_size} ranks "
                                     "cannot share evenly; make the global batch size a multiple of the "
                                     "number of processes (--batch-size)")
                n = value.shape[0] // self.world_size
                value = value[self.rank * n:(self.rank + 1) * n]
            out[key] = value
        return out

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar logs over ranks (one all-gather); the same dict on every rank.

        Keys may differ between ranks (SFT logs a loss per domain, and a rank's rows can hold no conversation
        of some domain): each key is averaged over the ranks that report it. A collective of fixed size
        over differing keys would pair unrelated values or hang.
        """
        if not self.enabled:
            return values
        per_rank = self.gather({k: float(v) for k, v in values.items()})
        keys = sorted(set().union(*per_rank))
        return {k: sum(r[k] for r in per_rank if k in r) / sum(k in r for r in per_rank) for k in keys}

    def sum(self, value: float) -> float:
        """The sum of a number over ranks (one all-reduce); the number itself in one process."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def gather(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order (one all-gather); `[obj]` in one process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: a stop decided on one rank stops them all together."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([int(bool(flag))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def print(self, *args, **kwargs) -> None:
        """`print` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


_current = DistContext()


def mean_logs(values: dict[str, float], ctx: DistContext | None = None) -> dict[str, float]:
    """Logged scalars combined over ranks whose keys may differ (a domain sampled on one rank only): each key
    averaged over the ranks that report it; keys naming a max or min take the max or min; counts (`num_*`)
    and throughputs (`*_per_s`) are summed. The same dict on every rank; `values` itself in one process."""
    ctx = ctx or _current
    if not ctx.enabled:
        return values
    per_rank = ctx.gather({k: float(v) for k, v in values.items()})
    out = {}
    for key in sorted(set().union(*per_rank)):
        vals = [r[key] for r in per_rank if key in r]
        if key.startswith("num_") or key.endswith("_per_s"):
            out[key] = sum(vals)
        else:
            out[key] = max(vals) if "max" in key else min(vals) if "min" in key else sum(vals) / len(vals)
    return out


def current() -> DistContext:
    """The context `init` set up (single process until then)."""
    return _current


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer; unset it or launch with "
                         "torchrun, which sets it") from None


def init(backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the job torchrun started (WORLD_SIZE > 1) or stay single-process; returns and activates the context.

    backend: default "cpu:gloo,cuda:nccl" on GPU machines (NCCL for the model, gloo for small CPU
    collectives such as logged scalars) and "gloo" on CPU-only ones.
    """
    global _current
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo"),
                                timeout=timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    _current = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)
    return _current


def shutdown(wait: bool = False) -> None:
    """Leave the process group (if any) and return to the single-process context.

    wait: a barrier first, so that no rank tears its connections down while another still uses them (the
    normal end of a job). Not after an error: the other ranks may be inside a different collective.
    """
    global _current
    if dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _current = DistContext()


@contextmanager
def session(backend: str | None = None):
    """`init()` for the duration of a command; leaves the process group only if this call created it."""
    created = not dist.is_initialized()
    ctx = init(backend)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        if created:
            shutdown(wait=finished)


def global_mean(total: torch.Tensor, count) -> torch.Tensor:
    """`total / count` over the global batch from this rank's sum and count: total · W / Σ_ranks count.

    FSDP averages the ranks' gradients, so this gives one process's mean over the whole batch even when the
    ranks hold different numbers of items (SFT: conversations of different lengths), where a mean per rank
    would weigh a short slice like a long one. The logged value averages over ranks to the global mean too.
    One process: total / max(count, 1).
    """
    ctx = current()
    n = float(count)
    if not ctx.enabled:
        return total / max(n, 1.0)
    return total * (ctx.world_size / max(ctx.sum(n), 1.0))


def bf16_policy():
    """FSDP2 mixed precision as torchtitan uses it: bf16 parameters and compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def is_sharded(model: nn.Module) -> bool:
    """Whether `apply_fsdp` (FSDP2) has sharded this model's parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def check_ready(model: nn.Module) -> None:
    """Raise a clear error when a trainer is about to run unsynchronised copies of one job.

    Under torchrun every process must join the group (`init`/`session`) and shard its model
    (`parallelize`); otherwise each would train alone and all would write the same run directory.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world > 1 and not _current.enabled:
        raise ValueError(f"started by torchrun with WORLD_SIZE={world}, but this command never joined the process "
                         "group; wrap it in `with dsv32.distributed.session():` and call "
                         "dsv32.distributed.parallelize(model) before training")
    if _current.enabled and not is_sharded(model):
        raise ValueError(f"running on {_current.world_size} ranks with an unsharded model; call "
                         "dsv32.distributed.parallelize(model) before training")


# -- parallelism ---------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, mp_policy=None, *, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each block, then the root (embedding, final norm, head), as torchtitan does.

    Inside each block the lightning indexer is a unit of its own, entered through `keys` and `queries`:
    its training loss (the indexer KL) leaves the block through the `Trace`, not through the block's
    output, and in DSA stage 1 it is the only loss. As its own unit the indexer is gathered again when
    the KL's gradient reaches its outputs, and its gradients are reduce-scattered even when no
    gradient flows through the blocks.

    mp_policy: a `torch.distributed.fsdp.MixedPrecisionPolicy` (see `bf16_policy`) or None for full
    precision (bf16 compute then comes from autocast, as in one process). Under a low-precision
    policy the indexer and the MoE router run with an fp32 policy, since the model keeps their
    weights (the indexer's head weights, the router) in fp32. `model.hidden` (the stage-1 loss skips
    the LM head) is registered so it gathers the root's parameters as `forward` does, and a `Trace`
    passes every unit untouched (`_pass_trace_through`). Apply activation checkpointing first.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ..model.indexer import Indexer
    from ..model.moe import Gate

    if not dist.is_initialized():
        raise ValueError("apply_fsdp needs a process group; call dsv32.distributed.init() under torchrun first")
    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp_policy = mp_policy or MixedPrecisionPolicy()
    low_precision = mp_policy.param_dtype not in (None, torch.float32)
    fp32_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    shard = partial(fully_shard, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for block in model.layers:
        for m in block.modules():
            if isinstance(m, Indexer):
                shard(m, mp_policy=fp32_policy if low_precision else mp_policy)
                register_fsdp_forward_method(m, "keys")
                register_fsdp_forward_method(m, "queries")
            elif isinstance(m, Gate) and low_precision:
                shard(m, mp_policy=fp32_policy)
        shard(block, mp_policy=mp_policy)
        _pass_trace_through(block)
    # The root's parameters are needed again right after the forward (backward of the head): keep them.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    _pass_trace_through(model)
    _pass_trace_through(model, "hidden")
    return model


class _Opaque:
    """A value FSDP's input processing does not look into."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _opaque(args, kwargs):
    from ..model import Trace

    def wrap(v):
        return _Opaque(v) if isinstance(v, Trace) else v

    return tuple(map(wrap, args)), {k: wrap(v) for k, v in kwargs.items()}


def _opaque_hook(module, args, kwargs):
    return _opaque(args, kwargs)


def _opaque_call(fn, *args, **kwargs):
    args, kwargs = _opaque(args, kwargs)
    return fn(*args, **kwargs)


def _unwrapping_call(fn, *args, **kwargs):
    def unwrap(v):
        return v.value if isinstance(v, _Opaque) else v

    return fn(*map(unwrap, args), **{k: unwrap(v) for k, v in kwargs.items()})


def _pass_trace_through(module: nn.Module, method: str = "forward") -> None:
    """Let a `Trace` argument pass an FSDP unit untouched; call right after `fully_shard(module)`.

    FSDP2 rebuilds the dataclasses and lists among a unit's inputs: to hook tensors that need
    gradients (a `Trace` holds the earlier layers' indexer KL) and to cast floating-point inputs under
    mixed precision. The model appends to the trace it was given, so a rebuilt copy would lose the
    records (the caller would see one layer's KL, or none). The trace therefore crosses FSDP's input
    handling in an opaque holder and is unwrapped just before the model's own code runs. For a method
    other than `forward`, this also registers it with FSDP (`register_fsdp_forward_method`).
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    if method == "forward":
        module.register_forward_pre_hook(_opaque_hook, prepend=True, with_kwargs=True)  # runs before FSDP's
        module.forward = partial(_unwrapping_call, module.forward)
        return
    setattr(module, method, partial(_unwrapping_call, getattr(module, method)))
    register_fsdp_forward_method(module, method)
    setattr(module, method, partial(_opaque_call, getattr(module, method)))


def _fresh_trace(trace):
    """An empty record shaped like `trace`, so a recomputed forward runs the same ops without re-recording."""
    if trace is None:
        return None
    return type(trace)(indexer_kl=None if trace.indexer_kl is None else [])


def _checkpointed_forward(block_forward, x, ctx, cache=None, route=None, trace=None):
    if not (torch.is_grad_enabled() and x.requires_grad):
        # No gradient flows through the block's main path (DSA stage 1, evaluation): nothing of it is
        # saved for backward anyway, and the indexer KL's own inputs are small and detached.
        return block_forward(x, ctx, cache, route, trace)
    calls = []

    def run(x):
        calls.append(None)
        return block_forward(x, ctx, cache, route, trace if len(calls) == 1 else _fresh_trace(trace))

    return checkpoint(run, x, use_reentrant=False)


def apply_ac(model: nn.Module) -> nn.Module:
    """Activation checkpointing per block: keep only each block's input, recompute the block in backward.

    Parameter names stay as they are (no wrapper module), so optimizer groups, state dicts and the HF
    export see the same model. The recomputation records nothing into the caller's `Trace` (routes,
    top-k and indexer-KL lists keep one entry per layer); non-reentrant checkpointing lets the indexer
    KL, which leaves the block through the trace, still receive its gradient. A block whose input
    needs no gradient runs as usual.
    """
    if is_sharded(model):
        raise ValueError("apply activation checkpointing before FSDP (dsv32.distributed.parallelize does both "
                         "in that order)")
    for block in model.layers:
        if isinstance(block.forward, partial) and block.forward.func is _checkpointed_forward:
            continue  # already applied
        block.forward = partial(_checkpointed_forward, block.forward)
    return model


def _broadcast_from_rank0(model: nn.Module) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def parallelize(model: nn.Module, ctx: DistContext | None = None, *, mp_policy=None,
                activation_checkpointing: bool = False) -> nn.Module:
    """Make a built model ready to train in this job: device, activation checkpointing, FSDP2.

    Single process: moves the model to `ctx.device` (a no-op on CPU) and optionally checkpoints
    activations. Distributed: rank 0's weights are broadcast first (every rank starts from the same
    model even if their random initialisations differed), then `apply_fsdp`. Returns the model (the
    same object; FSDP2 changes its class in place).
    """
    ctx = ctx or current()
    if ctx.enabled and ctx.world_size != dist.get_world_size():
        raise ValueError(f"context world size {ctx.world_size} != process group size {dist.get_world_size()}")
    model = model.to(ctx.device)
    if activation_checkpointing:
        apply_ac(model)
    if ctx.enabled:
        _broadcast_from_rank0(model)
        apply_fsdp(model, mp_policy)
    return model
