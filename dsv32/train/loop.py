"""The one training loop every stage shares; a stage passes only what differs (groups, loss_fn, hooks).

    from dsv32.train import TrainConfig, ParamGroup, train
    cfg = TrainConfig(lr=3e-3, steps=200, out_dir="runs/pretrain")
    summary = train(model, batches, cfg)          # resumes from runs/pretrain/ when it holds a checkpoint

`batches` yields dicts with "input_ids" [B, T], "labels" [B, T] (labels[t] is the target of position t,
-100 = ignored) and optionally "doc_ids" [B, T]; it has `state_dict()` / `load_state_dict()` so a resumed
run sees exactly the batches an uninterrupted one would. `loss_fn(model, batch)` returns a scalar loss or
`(loss, {name: float})`, the extras being logged.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from .. import distributed
from . import checkpoint
from .metrics import Metrics
from .optim import ParamGroup, TrainConfig, build_optimizer, clip_grads, set_lr


def cross_entropy(logits_BTV: torch.Tensor, batch: dict) -> torch.Tensor:
    """Next-token cross entropy; labels are already shifted, -100 marks positions without a target.
    With "loss_weights" in the batch, the mean is weighted (answer spans of synthetic documents count more)."""
    labels = batch["labels"].flatten()
    weights = batch.get("loss_weights")
    if weights is None:
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels, ignore_index=-100)
    per_token = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels, ignore_index=-100, reduction="none")
    w = weights.flatten().float() * (labels != -100)
    return (per_token * w).sum() / w.sum().clamp_min(1e-9)


def lm_loss(model, batch: dict) -> torch.Tensor:
    """The LM loss of a dense or sparse forward pass."""
    return cross_entropy(model(batch["input_ids"], doc_ids=batch.get("doc_ids")), batch)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _split(out) -> tuple[torch.Tensor, dict]:
    return (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, disable=None, dynamic_ncols=True, leave=False)


def train(model, batches, cfg: TrainConfig, loss_fn: Callable | None = None, groups: list[ParamGroup] | None = None,
          metrics: Metrics | None = None, resume: bool = True,
          on_step: Callable[[int, dict], bool | None] | None = None, keep: int = 3) -> dict:
    """Run optimizer steps until cfg.steps (or until `on_step` returns True); return a summary dict.

    on_step(step, logs): called after every optimizer step (step counts completed steps); returning
    True stops the run after a checkpoint, as an interruption would.

    Under torchrun (`dsv32.distributed.init()` + `parallelize(model)`), each rank trains on its slice
    of every global batch, logs are averaged over ranks, only rank 0 writes metrics, and checkpoints
    are DCP shards (`dsv32.distributed.checkpoint`); a single process runs exactly as without it.
    """
    loss_fn = loss_fn or lm_loss
    for name in ("__next__", "state_dict", "load_state_dict"):
        if not hasattr(batches, name):
            raise ValueError(f"batches has no {name}(); pass an iterator object with __next__, state_dict() and "
                             "load_state_dict() so checkpoints can resume the data stream")
    distributed.check_ready(model)  # under torchrun: the process group is joined and the model sharded
    dist = distributed.current()
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, cfg, groups)
    own_metrics = metrics is None
    metrics = metrics or (Metrics(cfg.out_dir) if dist.is_main else distributed.NullMetrics())

    step = 0
    ckpt = distributed.checkpoint.load_latest(cfg.out_dir) if resume else None
    if ckpt is not None:
        distributed.restore(ckpt, model, optimizer)  # either format; reshards DCP checkpoints
        batches.load_state_dict(ckpt.data)
        checkpoint.set_rng_state(ckpt.rng)
        step = ckpt.step
        metrics.log(step, {"resumed_from": str(ckpt.path)})
    else:
        torch.manual_seed(cfg.seed)

    def save(at: int) -> None:
        distributed.checkpoint.save(cfg.out_dir, at, model, optimizer, batches.state_dict(), checkpoint.rng_state(),
                                    cfg.to_dict(), keep=keep)

    model.train()
    bar = _progress(cfg.steps, step) if dist.is_main else None
    t0 = t_log = time.time()
    tokens_since_log, start_step, saved_at = 0, step, step if ckpt is not None else -1
    loss_val, losses = float("nan"), []
    try:
        while step < cfg.steps:
            lr = set_lr(optimizer, step, cfg)
            loss_sum, extras = 0.0, {}
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                tokens_since_log += int((batch["labels"] != -100).sum())  # the global batch: all ranks' tokens
                batch = _to(dist.shard(batch), device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, extra = _split(loss_fn(model, batch))
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + float(v) / cfg.grad_accum
            if dist.enabled:  # the logged loss is the mean over ranks, as the gradient is
                extras = dist.mean({"loss": loss_sum, **extras})
                loss_sum = extras.pop("loss")
            norms = clip_grads(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_val = loss_sum
            losses.append(loss_val)
            logs = {"loss": loss_val, "lr": lr, **{f"grad_norm/{k}": v for k, v in norms.items()}, **extras}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                metrics.log(step, {**logs, "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9)})
                t_log, tokens_since_log = now, 0
            stop = dist.any(bool(on_step(step, logs))) if on_step is not None else False
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or stop:
                save(step)
                saved_at = step
            if stop:
                break
        if saved_at != step:
            save(step)
    finally:
        if bar is not None:
            bar.close()
        if own_metrics:
            metrics.close()
    return {"final_loss": loss_val, "losses": losses, "steps": step, "steps_this_run": step - start_step,
            "seconds": time.time() - t0}
