"""`dsv32 bench attention`: one attention layer, DSA against dense MLA and transformers' DeepseekV32Attention.

One `MLA` layer with a preset's shapes (random weights, bf16) runs three ways on the same input:

- `dense`: the layer in dense mode. Prefill and train take its MHA path (`_mha`: PyTorch SDPA, causal,
  v padded to the qk head dim so the flash kernel is eligible); decode takes the absorbed masked path
  over the latent cache, as the model does.
- `dsa`: the layer in sparse mode: lightning indexer, top-k, sparse MLA through `dsv32.kernels.get(device)`.
  When no query sees more than k keys the layer runs its dense path (recorded in `path`).
- `hf`: `transformers`' `DeepseekV32Attention` (SDPA), called as `DeepseekV32DecoderLayer` calls it, with
  `DeepseekV32RotaryEmbedding` angles and the model's forced causal mask. Its top-k is folded into a
  boolean L x L mask, so its prefill memory is O(L^2): estimated first, skipped past the budget.

Phases: `prefill` (forward, no grad, batch 1), `train` (forward + backward, batch 1), `decode` (one new
token after L cached ones, at each `--batch`; the caches are filled with random latents and index keys
instead of a long prefill). Each case: warm-up, then the median of `--repeats` runs, within `--budget-s`.
Cases that would not fit (predicted time, estimated memory, or an allocation failure) are recorded as
skipped with the reason. Results: `attention.json`, `attention.md`, `attention.png` in `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from .. import kernels, presets
from ..io import write_json
from ..model.attention import MLA, RMSNorm
from ..model.cache import LayerCache
from . import costs, report
from .measure import MIN_TIMED_S, cpu_memory_limit, is_oom, time_runs

PHASES = ("prefill", "train", "decode")
IMPLS = ("dense", "dsa", "hf")
DEFAULT_LENGTHS = {"cpu": "4096,8192,16384,32768", "cuda": "4096,8192,16384,32768,65536,131072"}
DEFAULTS = {  # per device: repeats, warm-up runs, seconds per case
    "cpu": {"repeats": 3, "warmup": 1, "budget_s": 60.0},
    "cuda": {"repeats": 10, "warmup": 2, "budget_s": 20.0},
}
GiB = 2**30


class Skip(Exception):
    """A case that is not run; the message is the recorded reason."""


# -- arguments ----------------------------------------------------------------------------------------

def _length(s: str) -> int:
    s = s.strip().lower()
    mult = 1024 if s.endswith("k") else 1
    try:
        n = int(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise ValueError(f"length {s!r} is not a number (e.g. 4096 or 4k)") from None
    if n < 2:
        raise ValueError(f"length {n} is too short; lengths are context sizes in tokens (e.g. 4096 or 4k)")
    return n


def _int_list(values: list[str] | None, name: str, conv=int) -> list[int]:
    out = []
    for v in values or []:
        for part in v.split(","):
            if part.strip():
                try:
                    x = conv(part)
                except ValueError as e:
                    raise ValueError(f"--{name}: {e}") from None
                if x < 1:
                    raise ValueError(f"--{name}: {x} must be positive")
                out.append(x)
    return list(dict.fromkeys(out))


def _name_list(value: str, name: str, choices: tuple[str, ...]) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in out if v not in choices]
    if bad or not out:
        raise ValueError(f"--{name}: {', '.join(bad) or 'nothing'} not understood; choose from {', '.join(choices)}")
    return [c for c in choices if c in out]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model shapes (default: small)")
    p.add_argument("--lengths", action="append", metavar="L,...",
                   help=f"context lengths, e.g. 4096,8k (default CPU {DEFAULT_LENGTHS['cpu']}; "
                        f"CUDA {DEFAULT_LENGTHS['cuda']})")
    p.add_argument("--topk", action="append", metavar="K,...", help="DSA top-k values (default 2048,512)")
    p.add_argument("--batch", action="append", metavar="B,...", help="decode batch sizes (default 1,8); "
                   "prefill and train run at batch 1")
    p.add_argument("--phases", default=",".join(PHASES), help="subset of prefill,train,decode")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset of dense,dsa,hf")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, help="timed runs per case, median reported (default CPU 3, CUDA 10; "
                   "then cases of a few ms, decode steps, repeat until about 1 s is timed, at most 100 times)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default CPU 1, CUDA 2)")
    p.add_argument("--budget-s", type=float, help="seconds per case; fewer repeats at long lengths, and cases "
                   "predicted to need more for one run are skipped (default CPU 60, CUDA 20)")
    p.add_argument("--total-budget-s", type=float, help="stop starting new cases after this many seconds "
                   "(the rest are recorded as skipped)")
    p.add_argument("--mem-gb", type=float, help="memory a case may use (default: 75%% of available RAM on CPU, "
                   "90%% of free GPU memory on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")


# -- environment --------------------------------------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return dev


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"{model or 'CPU'} ({torch.get_num_threads()} threads)"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _backend_name(dev: torch.device) -> str:
    b = kernels.get(dev.type)
    return b.__name__.rsplit(".", 1)[-1].lstrip("_").lower()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(_nbytes(p) for p in module.parameters())


@torch.no_grad()
def _init_(module: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    """Random weights like `Transformer.init_weights`: linear N(0, std), norms 1 (and LayerNorm bias 0)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
        elif isinstance(m, torch.nn.LayerNorm) or isinstance(m, RMSNorm) or type(m).__name__.endswith("RMSNorm"):
            m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


# -- the bench ----------------------------------------------------------------------------------------

class AttentionBench:
    def __init__(self, args: argparse.Namespace):
        self.device = _device(args.device)
        dev = self.device.type
        self.cfg = presets.get(args.preset)
        self.preset = args.preset
        self.dtype = getattr(torch, args.dtype)
        self.lengths = _int_list(args.lengths or [DEFAULT_LENGTHS[dev]], "lengths", _length)
        self.topks = _int_list(args.topk or ["2048,512"], "topk")
        self.batches = _int_list(args.batch or ["1,8"], "batch")
        self.phases = _name_list(args.phases, "phases", PHASES)
        self.impls = _name_list(args.impls, "impls", IMPLS)
        d = DEFAULTS[dev]
        self.repeats = d["repeats"] if args.repeats is None else args.repeats
        self.min_timed_s = MIN_TIMED_S if args.repeats is None else 0.0  # --repeats N: exactly N (budget allowing)
        self.warmup = d["warmup"] if args.warmup is None else args.warmup
        self.budget_s = d["budget_s"] if args.budget_s is None else args.budget_s
        if self.repeats < 1 or self.warmup < 1 or self.budget_s <= 0:
            raise ValueError("--repeats and --warmup must be at least 1 and --budget-s positive")
        self.total_budget_s = args.total_budget_s
        self.out = Path(args.out)
        self.seed = args.seed
        if args.mem_gb is not None:
            self.mem_budget = int(args.mem_gb * GiB)
        elif dev == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.mem_budget = int(0.9 * free)
        else:
            avail = _mem_available()
            self.mem_budget = int(0.75 * avail) if avail else None
        self.device_name = _device_name(self.device)
        self.backend = _backend_name(self.device)
        self.records: list[dict] = []
        self._series: dict[tuple, tuple[int, float]] = {}  # (impl, phase, batch, topk) -> (L, s per run)
        self._oom: dict[tuple, int] = {}  # series -> shortest length that ran out of memory
        self._build()

    # -- modules --------------------------------------------------------------------------------------

    def _build(self) -> None:
        from ..model.transformer import Transformer

        gen = torch.Generator().manual_seed(self.seed)
        self.layer = MLA(self.cfg)
        _init_(self.layer, self.cfg.init_std, gen)
        self.layer.to(device=self.device, dtype=self.dtype)  # the indexer's weights_proj stays fp32
        # `Transformer.context` builds the AttnContext (RoPE angles, visible ranges, mode); a one-layer
        # model on the meta device provides it without allocating weights.
        with torch.device("meta"):
            self.ctx_model = Transformer(self.cfg.replace(**{"n_layers": 1, "moe.n_dense_layers": 1}))
        self.hf = None
        if "hf" in self.impls:  # now, not inside a case: imports must not run under the CPU memory cap
            self._hf()

    def _ctx(self, mode: str, B: int, T: int, start: int):
        self.ctx_model.set_attn_mode(mode)
        return self.ctx_model.context(B, T, start, None, None, self.device)

    def _hf(self):
        if self.hf is None:
            import transformers
            import transformers.cache_utils  # noqa: F401 - used by the cases
            import transformers.masking_utils  # noqa: F401
            from transformers.models.deepseek_v32 import modeling_deepseek_v32 as M

            from ..model.hf import config_to_hf

            hf_cfg = transformers.DeepseekV32Config(**config_to_hf(self.cfg))
            hf_cfg._attn_implementation = "sdpa"
            attn = M.DeepseekV32Attention(hf_cfg, layer_idx=0)
            _init_(attn, self.cfg.init_std, torch.Generator().manual_seed(self.seed))
            attn.to(device=self.device, dtype=self.dtype)
            attn.indexer.weights_proj.float()  # transformers keeps it fp32 (_keep_in_fp32_modules)
            rotary = M.DeepseekV32RotaryEmbedding(hf_cfg).to(self.device)
            self.hf = (hf_cfg, attn, rotary, transformers.__version__)
        return self.hf

    def _randn(self, *shape, requires_grad=False) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype, requires_grad=requires_grad)

    # -- cases: each returns (step, reset, static bytes, path) ---------------------------------------

    def _dsv32_case(self, impl: str, phase: str, L: int, k: int, B: int):
        layer = self.layer
        layer.topk = k  # the layer reads its top-k from this attribute (set from the config at build)
        mode = "sparse" if impl == "dsa" else "dense"
        weights = _param_bytes(layer)
        if phase == "decode":
            cache = LayerCache(self.cfg, B, L + 1, self.dtype, self.device)
            cache.kv.normal_()
            cache.pe.normal_()
            cache.index_k.copy_(torch.randn(cache.index_k.shape, device=self.device))
            x = self._randn(B, 1, self.cfg.dim)
            ctx = self._ctx(mode, B, 1, L)

            def step():
                with torch.no_grad():
                    layer(x, ctx, cache)

            static = weights + _nbytes(x, cache.kv, cache.pe, cache.index_k, cache.index_scale)
            path = ("sparse" if impl == "dsa" and L + 1 > k else "absorbed masked") + " (latent cache)"
            return step, lambda: None, static, self._path(path, impl == "dsa" and L + 1 > k)

        ctx = self._ctx(mode, B, L, 0)
        train = phase == "train"
        x = self._randn(B, L, self.cfg.dim, requires_grad=train)
        sparse = impl == "dsa" and L > k
        path = self._path("sparse" if sparse else "mha (SDPA causal)", sparse)
        if not train:
            def step():
                with torch.no_grad():
                    layer(x, ctx)

            return step, lambda: None, weights + _nbytes(x), path
        g = self._randn(B, L, self.cfg.dim)

        def step():
            layer(x, ctx).backward(g)

        def reset():
            x.grad = None
            layer.zero_grad(set_to_none=True)

        return step, reset, weights + _nbytes(x, g), path

    def _path(self, path: str, sparse: bool) -> str:
        return f"{path} [kernels: {self.backend}]" if sparse else path

    def hf_prefill_bytes(self, L: int, B: int, train: bool) -> int:
        """transformers' prefill memory that grows as L^2 (the part that decides whether it fits).

        The indexer's fp32 scores [B, L, H_I, L] exist twice at once (scaled, then ReLU'd), then the fp32
        index scores [B, L, L], the causal mask and the top-k mask (bool, a few copies); SDPA gets a
        masked call (CUDA: an additive bf16 mask; CPU: the math path keeps [B, H, L, L] probabilities,
        also for backward in training)."""
        HI, H = self.cfg.indexer.n_heads, self.cfg.mla.n_heads
        per_pair = 8 * HI + 4 + 4
        if self.device.type == "cuda":
            per_pair += 2
        else:
            per_pair += H * (4 + 2) * (2 if train else 1)
        return B * L * L * per_pair

    def _hf_case(self, phase: str, L: int, k: int, B: int):
        hf_cfg, attn, rotary, _ = self._hf()
        attn.indexer.index_topk = k
        weights = _param_bytes(attn)
        if phase == "decode":
            return self._hf_decode_case(L, B, weights)
        train = phase == "train"
        need = self.hf_prefill_bytes(L, B, train)
        if self.mem_budget is not None and need > self.mem_budget:
            raise Skip(f"its O(L^2) masks and indexer scores need ~{_size(need)} > the memory budget "
                       f"{_size(self.mem_budget)} (--mem-gb)")
        x = self._randn(B, L, self.cfg.dim, requires_grad=train)
        pos = torch.arange(L, device=self.device)[None].expand(B, L)
        with torch.no_grad():
            cos_sin = rotary(x, pos)
        mask = self._hf_causal_mask(hf_cfg, x, pos)
        static = weights + _nbytes(x, mask, *cos_sin)
        if not train:
            def step():
                with torch.no_grad():
                    attn(x, cos_sin, mask)

            return step, lambda: None, static, "sdpa + boolean top-k mask"
        g = self._randn(B, L, self.cfg.dim)

        def step():
            attn(x, cos_sin, mask)[0].backward(g)

        def reset():
            x.grad = None
            attn.zero_grad(set_to_none=True)

        return step, reset, static + _nbytes(g), "sdpa + boolean top-k mask"

    def _hf_causal_mask(self, hf_cfg, x, pos) -> torch.Tensor:
        """The mask DeepseekV32Model builds: create_causal_mask(..., allow_is_causal_skip=False)."""
        from transformers.masking_utils import create_causal_mask

        B, L = pos.shape
        try:  # the cache argument was renamed (past_key_values -> cache): pass it by position
            mask = create_causal_mask(hf_cfg, x, None, None, pos, allow_is_causal_skip=False)
        except TypeError:
            mask = None
        if mask is None or not isinstance(mask, torch.Tensor):
            mask = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()[None, None].expand(B, 1, L, L)
        return mask

    def _hf_decode_case(self, L: int, B: int, weights: int):
        """A DynamicCache holding L random tokens, then one new token per step.

        The cache layout differs across transformers releases (5.17 caches the expanded per-head K/V,
        later releases the latents), so a 2-token probe reads the layout and the real cache is filled
        with random tensors of those shapes (plus L index keys)."""
        from transformers.cache_utils import DynamicCache

        hf_cfg, attn, rotary, _ = self._hf()
        with torch.no_grad():
            probe = DynamicCache(config=hf_cfg)
            x2 = self._randn(B, 2, self.cfg.dim)
            pos2 = torch.arange(2, device=self.device)[None].expand(B, 2)
            mask2 = torch.ones(2, 2, dtype=torch.bool, device=self.device).tril()[None, None].expand(B, 1, 2, 2)
            attn(x2, rotary(x2, pos2), mask2, probe)
            layer0 = probe.layers[0]
            ks, vs = layer0.keys.shape, layer0.values.shape
            del probe
            cache = DynamicCache(config=hf_cfg)
            cache.update(self._randn(B, ks[1], L, ks[3]), self._randn(B, vs[1], L, vs[3]), 0)
            cache.update_indexer(self._randn(B, L, self.cfg.indexer.head_dim), 0)
            x = self._randn(B, 1, self.cfg.dim)
            cos_sin = rotary(x, torch.full((B, 1), L, device=self.device))
        per_token = ks[1] * ks[3] + vs[1] * vs[3] + self.cfg.indexer.head_dim
        static = weights + _nbytes(x) + B * L * per_token * x.element_size()

        def step():  # each step appends its token (as generation does); the mask covers the cache
            with torch.no_grad():
                mask = torch.ones(B, 1, 1, cache.get_seq_length() + 1, dtype=torch.bool, device=self.device)
                attn(x, cos_sin, mask, cache)

        layout = "latent" if ks[1] == 1 else "expanded per-head K/V"
        return step, lambda: None, static, f"sdpa + boolean top-k mask, DynamicCache ({layout})"

    # -- running ----------------------------------------------------------------------------------------

    def _base_record(self, impl, phase, L, k, B) -> dict:
        b = costs.bounds(self.cfg, phase, L, k, B, torch.finfo(self.dtype).bits // 8)
        return {"length": L, "topk": k, "phase": phase, "batch": B, "impl": impl, "ms": None, "peak_mb": None,
                "device": self.device.type, "device_name": self.device_name, "dtype": str(self.dtype).split(".")[-1],
                "preset": self.preset, "flop_ratio_bound": b["attn"], "ratio_bound_layer": b["layer"],
                "bound_kind": b["kind"], "skipped": False, "reason": None}

    def run_case(self, impl: str, phase: str, L: int, k: int, B: int) -> dict:
        rec = self._base_record(impl, phase, L, k, B)
        key = (impl, phase, B, None if impl == "dense" else k)
        t_case = time.perf_counter()
        case = None  # (step, reset, ...): dropped before the memory is cleaned up, also after a failure
        try:
            if self.total_budget_s is not None and time.perf_counter() - self._t0 > self.total_budget_s:
                raise Skip(f"--total-budget-s {self.total_budget_s:g} used up")
            if key in self._oom and L >= self._oom[key]:
                raise Skip(f"out of memory already at length {self._oom[key]}")
            if key in self._series:
                L0, s0 = self._series[key]
                predicted = s0 * (L / L0) ** (1 if phase == "decode" else 2)
                if predicted > self.budget_s:
                    raise Skip(f"one run predicted at ~{predicted:.0f} s (from {s0:.2g} s at length {L0}) "
                               f"> --budget-s {self.budget_s:g}")
            guard = cpu_memory_limit(self.mem_budget) if self.device.type == "cpu" else contextlib.nullcontext()
            with guard:
                case = self._hf_case(phase, L, k, B) if impl == "hf" else self._dsv32_case(impl, phase, L, k, B)
                step, reset, static, path = case
                rec["path"] = path
                rec["static_mb"] = round(static / 2**20, 2)
                m = time_runs(step, reset, self.device, warmup=self.warmup, repeats=self.repeats,
                              budget_s=self.budget_s, min_timed_s=self.min_timed_s)
            rec.update(ms=round(m["ms"], 4), peak_mb=round(m["peak_bytes"] / 2**20, 2), times_ms=m["times_ms"],
                       cpu_ms=None if m["cpu_ms"] is None else round(m["cpu_ms"], 4),
                       repeats=len(m["times_ms"]), warmup=m["warmup"])
            if m["note"]:
                rec["note"] = m["note"]
            self._series[key] = (L, m["ms"] / 1e3)
        except Skip as e:
            rec.update(skipped=True, reason=str(e))
        except Exception as e:  # noqa: BLE001 - one failing case must not end a long run
            if is_oom(e):
                self._oom[key] = min(L, self._oom.get(key, L))
                rec.update(skipped=True, reason="out of memory: " + str(e).strip().splitlines()[0][:200])
            else:
                rec.update(skipped=True, reason=f"error: {type(e).__name__}: {str(e).strip()[:300]}")
                traceback.print_exc(file=sys.stderr)
        finally:
            case = step = reset = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        rec["wall_s"] = round(time.perf_counter() - t_case, 3)
        return rec

    def cases(self):
        for L in self.lengths:
            for phase in self.phases:
                for B in (self.batches if phase == "decode" else [1]):
                    for impl in self.impls:
                        if impl == "dense":  # dense does not depend on k: one measurement, one record per k
                            yield impl, phase, L, None, B
                        else:
                            for k in self.topks:
                                yield impl, phase, L, k, B

    def run(self) -> list[dict]:
        self._t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        todo = list(self.cases())
        n_total = sum(len(self.topks) if k is None else 1 for _, _, _, k, _ in todo)
        print(f"dsv32 bench attention: preset {self.preset}, {self.device_name}, {str(self.dtype).split('.')[-1]}, "
              f"dsa kernels {self.backend}; {n_total} records -> {self.out}", flush=True)
        i = 0
        for impl, phase, L, k, B in todo:
            rec = self.run_case(impl, phase, L, k if k is not None else self.topks[0], B)
            recs = [dict(rec, topk=kk, **costs_for(self, phase, L, kk, B)) for kk in self.topks] if k is None else [rec]
            if k is None and len(self.topks) > 1:
                for r in recs:
                    r["note"] = (r.get("note", "") + "; " if r.get("note") else "") + \
                        "dense does not use top-k: one measurement shared by the top-k values"
            for r in recs:
                i += 1
                dense = self._dense_of(r)
                if dense is not None and not r["skipped"]:
                    r["speedup_vs_dense"] = round(dense["ms"] / r["ms"], 4)
                self.records.append(r)
                print(_progress(i, n_total, r), flush=True)
            self._write_json()  # after every case, so a long run that stops early keeps its results
        meta = self.meta()
        md = report.markdown(self.records, meta)
        (self.out / "attention.md").write_text(md)
        png = report.plot(self.records, meta, self.out / "attention.png")
        print(f"wrote {self.out / 'attention.json'}, {self.out / 'attention.md'}"
              + (f", {png}" if png else " (no plot: matplotlib is not installed; pip install matplotlib)"), flush=True)
        return self.records

    def _dense_of(self, r: dict) -> dict | None:
        if r["impl"] == "dense":
            return None
        key = (r["length"], r["topk"], r["phase"], r["batch"])
        return next((d for d in self.records if d["impl"] == "dense" and not d["skipped"]
                     and (d["length"], d["topk"], d["phase"], d["batch"]) == key), None)

    def _write_json(self) -> None:
        write_json(self.out / "attention.json", self.records, indent=1)

    def meta(self) -> dict:
        s = costs.Shapes.of(self.cfg)
        try:
            import transformers
            tv = transformers.__version__
        except ImportError:
            tv = None
        return {"preset": self.preset, "device": self.device.type, "device_name": self.device_name,
                "dtype": str(self.dtype).split(".")[-1], "torch": torch.__version__, "transformers": tv,
                "kernels": self.backend, "repeats": self.repeats, "min_timed_s": self.min_timed_s,
                "warmup": self.warmup, "budget_s": self.budget_s,
                "shapes": dataclasses.asdict(s), "c": s.c, "mha_pair_flops": s.mha_pair,
                "absorbed_pair_flops": s.absorbed_pair,
                "peak_memory": ("torch.cuda.max_memory_allocated above the case's starting allocation"
                                if self.device.type == "cuda" else
                                "live tensor storage bytes (TorchDispatchMode) above the case's start, first run")}


def costs_for(bench: AttentionBench, phase: str, L: int, k: int, B: int) -> dict:
    b = costs.bounds(bench.cfg, phase, L, k, B, torch.finfo(bench.dtype).bits // 8)
    return {"flop_ratio_bound": b["attn"], "ratio_bound_layer": b["layer"], "bound_kind": b["kind"]}


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _progress(i: int, n: int, r: dict) -> str:
    head = (f"[{i:>{len(str(n))}}/{n}] {r['phase']:7} L={r['length']:<6} k={r['topk']:<5} B={r['batch']:<2} "
            f"{r['impl']:5}")
    if r["skipped"]:
        return f"{head}  skipped: {r['reason']}"
    runs = f"{r['repeats']} run{'s' * (r['repeats'] != 1)}"
    return (f"{head} {r['ms']:10.2f} ms  peak {r['peak_mb']:9.1f} MB  ({runs}, {r['wall_s']:.1f} s)"
            + (f"  dense/{r['impl']} {r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else ""))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 bench attention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args = p.parse_args(argv)
    AttentionBench(args).run()
    return 0

