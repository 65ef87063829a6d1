"""Distributed checkpoints (DCP) that reshard, and the consolidated Hugging Face export.

A sharded run writes the same folder layout as a single-process one (`dsv32.train.checkpoint`), with the
model and optimizer in DCP's format instead of safetensors + optimizer.pt:

    out_dir/
      latest                        "step_00000300"
      step_00000300/
        .metadata, __0_0.distcp ... model and optimizer shards (torch.distributed.checkpoint)
        config.json                 the model's config (HF format), so --init-from can rebuild it
        rng-rank{r}.pt              each rank's RNG state
        trainer.json                step, data cursor, resolved config (written last, by rank 0)

Every rank writes its shards into `.tmp-step_N-dcp/`; rank 0 renames the folder once all ranks are done,
so a `step_*` folder is complete. State dicts go through `get_state_dict` / `set_state_dict`, keyed by
parameter names rather than by rank layout, so a checkpoint saved on W ranks loads on any other number
(one process included), and a single-process checkpoint (HF weights + optimizer.pt) loads into a sharded
model. `restore` reads both formats; `save` writes the legacy one when the model is not sharded.

`export_hf(model, dir)` gathers the full weights (a collective: every rank calls it) and rank 0 writes a
`DeepseekV32ForCausalLM` directory through `dsv32.model.hf` (what vLLM and SGLang serve).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from ..io import atomic_write
from ..train import checkpoint as train_checkpoint
from .parallel import current, is_sharded

# torch.distributed.checkpoint is imported where it is used: it takes over a second to import, and
# single-process runs (which import this module through the training loop) never need it.

_META = ".metadata"


def is_dcp(path) -> bool:
    """Whether a checkpoint folder holds DCP shards (rather than HF weights + optimizer.pt)."""
    return (Path(path) / _META).is_file()


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


# -- model + optimizer --------------------------------------------------------------------------


def save_dcp(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write the model (and optimizer) state as DCP shards into `path` (collective when distributed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=str(path))


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _drop_state_except(model: nn.Module, optimizer: torch.optim.Optimizer, keep: set[str]) -> None:
    """Forget optimizer state of parameters the checkpoint had none for (never had a gradient).

    `get_state_dict`/`set_state_dict` initialise every trainable parameter's state with a zero-lr step;
    dropping it again leaves the optimizer exactly as the saved one was (AdamW's step count included).
    """
    names = _names(model)
    for p in list(optimizer.state):
        if names.get(id(p)) not in keep:
            del optimizer.state[p]


def load_dcp(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load DCP shards from `path` into `model` (and `optimizer`), whatever the number of ranks that wrote them.

    The optimizer must already be built over the model (its param groups name the parameters).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    path = Path(path)
    if not is_dcp(path):
        raise ValueError(f"{path} is not a distributed checkpoint (no {_META}); pass a step_* folder written "
                         "by a sharded run")
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(model, state["model"])
            return
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # Trainable parameters that never had a gradient have no saved state: ask only for what exists.
        with_state = {fqn for fqn in optim_sd["state"] if any(k.startswith(f"optim.state.{fqn}.") for k in saved)}
        optim_sd["state"] = {fqn: s for fqn, s in optim_sd["state"].items() if fqn in with_state}
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))  # raises on any model tensor missing from the checkpoint
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        _drop_state_except(model, optimizer, with_state)
    except (RuntimeError, KeyError, CheckpointException) as e:
        raise ValueError(f"{path}: the distributed checkpoint does not fit this model/optimizer ({str(e)[:300]}); "
                         "resume with the same model config and stage, or start afresh with resume=False") from None


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`optimizer.state_dict()` (keyed by position) rewritten with parameter names, for `set_state_dict`.

    Positions follow `optimizer.param_groups`, which `build_optimizer` fills in the model's parameter
    order: the same on a sharded and an unsharded model of one config.
    """
    names = _names(model)
    groups, by_pos = [], {}
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(optimizer.param_groups)}; resume with the same stage (same groups)")
    for saved, live in zip(saved_groups, optimizer.param_groups):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(f"optimizer group {live.get('group')!r} holds {len(saved['params'])} parameters in "
                             f"the checkpoint and {len(live['params'])} here; resume with the same stage")
        fqns = [names[id(p)] for p in live["params"]]
        by_pos.update(zip(saved["params"], fqns))
        groups.append({**saved, "params": fqns})
    return {"state": {by_pos[pos]: s for pos, s in state["state"].items()}, "param_groups": groups}


def _load_legacy_sharded(ckpt: train_checkpoint.Checkpoint, model: nn.Module, optimizer) -> None:
    """A single-process checkpoint (HF weights + optimizer.pt) into an FSDP-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from ..model import Transformer

    try:
        full = Transformer.from_pretrained(ckpt.path, dtype=next(model.parameters()).dtype).state_dict()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{ckpt.path}: model weights are unreadable ({type(e).__name__}: {e}); delete this "
                         "folder to resume from the previous checkpoint, or start afresh with resume=False") from None
    optim = _named_optimizer_state(model, optimizer, ckpt.optimizer)
    set_state_dict(model, optimizer, model_state_dict=full, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    _drop_state_except(model, optimizer, set(optim["state"]))


def restore(ckpt: train_checkpoint.Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state from a checkpoint of either format, into a sharded or unsharded model."""
    if is_dcp(ckpt.path):
        load_dcp(ckpt.path, model, optimizer)
    elif is_sharded(model):
        _load_legacy_sharded(ckpt, model, optimizer)
    else:  # the single-process path, exactly as before
        ckpt.load_model(model)
        optimizer.load_state_dict(ckpt.optimizer)


# -- training checkpoints ------------------------------------------------------------------------


def save(out_dir, step: int, model: nn.Module, optimizer, data_state: dict, rng: dict, config_dict: dict,
         keep: int = 3, extras: dict | None = None) -> Path:
    """Write `out_dir/step_{step:08d}/`: DCP when the model is sharded (every rank calls this), else the
    single-process format (`dsv32.train.checkpoint.save`). `extras` (full tensors, the same on every rank)
    are written once, by rank 0."""
    if not is_sharded(model):
        return train_checkpoint.save(out_dir, step, model, optimizer, data_state, rng, config_dict, keep=keep,
                                     extras=extras)
    from ..model.hf import config_to_hf

    ctx = current()
    out_dir = Path(out_dir)
    final = out_dir / f"step_{step:08d}"
    tmp = out_dir / f".tmp-{final.name}-dcp"
    trainer_text = train_checkpoint.trainer_json(step, data_state, config_dict)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving this step
        tmp.mkdir(parents=True)
    ctx.barrier()
    save_dcp(tmp, model, optimizer)
    torch.save(rng, tmp / _rng_file(ctx.rank))
    ctx.barrier()  # every rank's files are on disk
    if ctx.is_main:
        hf = config_to_hf(model.cfg)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        train_checkpoint.write_extras(tmp, extras)
        (tmp / "trainer.json").write_text(trainer_text)
        if final.exists():  # re-saving the same step (a resumed run that ends where it stopped)
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write(out_dir / "latest", final.name + "\n")
        for old in train_checkpoint.list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()  # nobody reads or writes the run folder before the rename
    return final


def _load_dcp_folder(path: Path) -> train_checkpoint.Checkpoint:
    rank = current().rank
    trainer_file = path / "trainer.json"
    if not trainer_file.is_file():
        raise train_checkpoint._corrupt(trainer_file, "missing")
    try:
        trainer = json.loads(trainer_file.read_text())
        step = int(trainer["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise train_checkpoint._corrupt(trainer_file, f"not a valid trainer state ({e})") from None
    # A run resumed on more ranks than it was saved with starts the extra ranks from rank 0's RNG.
    rng_file = path / _rng_file(rank) if (path / _rng_file(rank)).is_file() else path / _rng_file(0)
    try:
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise train_checkpoint._corrupt(rng_file, f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return train_checkpoint.Checkpoint(path, step, trainer.get("data"), trainer.get("config", {}), None, rng)


def load(path) -> train_checkpoint.Checkpoint:
    """One checkpoint folder of either format (`optimizer` is None for DCP: `restore` reads it)."""
    path = Path(path)
    return _load_dcp_folder(path) if is_dcp(path) else train_checkpoint.load(path)


def load_latest(out_dir) -> train_checkpoint.Checkpoint | None:
    """The newest complete checkpoint of either format (`optimizer` is None for DCP: `restore` reads it)."""
    found = train_checkpoint.list_checkpoints(out_dir)
    if not found:
        return None
    return load(found[-1])


def load_model(path, dtype: torch.dtype | None = torch.float32, **overrides):
    """A plain `Transformer` from a DCP step folder (its config.json + the model shards), e.g. for --init-from."""
    from ..model import Transformer
    from ..model.hf import config_from_hf

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json beside the distributed checkpoint; it was not written by "
                         "dsv32.distributed.checkpoint.save")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    model = Transformer(cfg.replace(**overrides) if overrides else cfg)
    load_dcp(path, model)
    return model.to(dtype) if dtype is not None else model


# -- consolidated export ---------------------------------------------------------------------------


def full_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights as plain CPU tensors (collective when sharded: every rank must call it).

    rank0_only: other ranks get an empty dict (saves their memory when only rank 0 writes).
    """
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in state.items()}


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy a (possibly sharded) model's weights into an unsharded replica on every rank, in place.

    For RL: each rank keeps a plain copy of the policy for rollouts (the engine runs it without any
    collective) and refreshes it from the FSDP-trained policy after each update (a collective).
    """
    state = full_state_dict(src)
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            if name not in state:
                raise ValueError(f"copy_weights: the source has no tensor {name!r}; the models differ in config")
            t.copy_(state[name].to(t.device, t.dtype))


def export_hf(model: nn.Module, path) -> None:
    """Write a consolidated Hugging Face `DeepseekV32ForCausalLM` directory (collective when sharded; rank 0 writes)."""
    if not is_sharded(model):
        model.save_pretrained(path)
        return
    from ..model import Transformer

    ctx = current()
    state = full_state_dict(model, rank0_only=True)
    if ctx.is_main:
        with torch.device("meta"):
            plain = Transformer(model.cfg)
        plain.load_state_dict(state, assign=True)
        if model.cfg.tie_embeddings:
            plain.head.weight = plain.embed.weight
        plain.save_pretrained(path)
    ctx.barrier()  # the directory is complete for every rank once this returns
