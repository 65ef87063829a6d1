"""Timing and peak-memory helpers for the benchmarks.

- `time_runs`: warm-up runs, then the median of `repeats` timed runs (CUDA: synchronised before and
  after each run); runs of a few ms repeat until about a second is timed. The per-case time budget cuts
  the repeats, never the measurement itself.
- Peak memory, in bytes *above what was allocated before the case started* (activations, temporaries,
  gradients; weights, inputs and caches are reported separately by the caller):
  - CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the baseline.
  - CPU: `LiveTensorBytes`, a TorchDispatchMode that adds up the storages of every tensor an op returns
    while they are alive, during one (untimed-overhead) warm-up run. It sees each ATen op's outputs,
    including the tensors autograd saves for backward, but not scratch memory a native kernel
    allocates and frees inside itself (e.g. the per-thread buffers of CPU flash attention).
- `cpu_memory_limit`: an RLIMIT_AS guard so a CPU case that asks for more than the budget fails with a
  catchable allocation error instead of waking the OOM killer.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref

try:
    import resource
except ImportError:  # not on Windows: no address-space cap there
    resource = None

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the summed storage bytes of tensors created inside the mode and still alive.

    Storages are keyed by data pointer and counted once however many views share them; outputs that
    alias a tensor created before the mode (views of weights, slices of a cache) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # data_ptr -> [nbytes, live tensor objects]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._refs[key]
            self.live -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in outs:
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                if key in inputs:  # a view of (or in-place write into) a tensor from outside the mode
                    continue
                entry = self._refs[key] = [st.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def cpu_memory_limit(budget_bytes: int | None):
    """Cap the address space at (current + budget) for the duration (Linux; a no-op elsewhere)."""
    vm = _vm_bytes()
    if budget_bytes is None or vm is None or resource is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + int(budget_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_oom(e: BaseException) -> bool:
    """An allocation failure (CUDA OOM, or the CPU allocator refusing under `cpu_memory_limit`)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(
        s in msg for s in ("out of memory", "can't allocate memory", "Cannot allocate memory"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device, cpu_times: list | None = None) -> float:
    """Wall seconds of one run; its process CPU seconds are appended to `cpu_times` when given."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    return time.perf_counter() - t0


MIN_TIMED_S = 1.0  # fast cases (decode steps) run more than `repeats` times, until about this much is timed
MAX_REPEATS = 100


def time_runs(step, reset, device: torch.device, *, warmup: int, repeats: int, budget_s: float,
              min_timed_s: float = MIN_TIMED_S) -> dict:
    """Run `step` (after `reset`, untimed) `warmup` + up to `repeats` times (more for runs of a few ms:
    up to `MAX_REPEATS`, so that about `min_timed_s` is timed and the median is not one of three noisy steps).

    Returns {"ms": median, "times_ms": [...], "cpu_ms": median process CPU time, "peak_bytes": int,
    "warmup": n, "note": str | None}. On a shared CPU the CPU time is the steadier measure: other
    processes stretch the wall time of a run but not the CPU time it needs.
    The first warm-up run also measures peak memory. Repeats are cut so the case stays within
    `budget_s` (judged by the last warm-up run), but at least one run is timed after the warm-up: the
    first run's time would include the memory tracking's per-op cost.
    """
    note = None
    warmup = max(1, warmup)
    cuda = device.type == "cuda"

    def start_peak() -> int:
        reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return 0

    # The first warm-up run also measures peak memory (CPU: under LiveTensorBytes).
    base = start_peak()
    mode = contextlib.nullcontext() if cuda else LiveTensorBytes()
    with mode:
        first = _timed(step, device)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else mode.peak
    del mode
    spent = last = first
    n_warm = 1
    for _ in range(warmup - 1):
        if spent + last > budget_s:
            break
        reset()
        last = _timed(step, device)
        spent += last
        n_warm += 1
    repeats = max(repeats, min(MAX_REPEATS, int(min_timed_s / max(last, 1e-9))))
    # at least one timed run: the tracked first run pays for the tracking (per op, so more for many small ops)
    repeats = max(1, min(repeats, int((budget_s - spent) / max(last, 1e-9))))
    if repeats == 1 and spent + last > budget_s:
        note = "one timed run: the warm-up used the time budget"
    times, cpu = [], []
    base = start_peak()
    for _ in range(repeats):
        reset()
        times.append(_timed(step, device, cpu))
    if cuda:  # the timed runs' peak (the first run may include compilation and autotuning)
        peak = torch.cuda.max_memory_allocated(device) - base
    reset()
    return {"ms": statistics.median(times) * 1e3, "times_ms": [round(t * 1e3, 4) for t in times],
            "cpu_ms": statistics.median(cpu) * 1e3 if cpu else None,
            "peak_bytes": int(peak), "warmup": n_warm, "note": note}
