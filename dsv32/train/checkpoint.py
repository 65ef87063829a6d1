"""Training checkpoints: the one module that writes and reads them.

    out_dir/
      latest                     "step_00000300" (written atomically after the folder is complete)
      step_00000300/
        config.json, model.safetensors   model.save_pretrained (a Hugging Face directory)
        optimizer.pt                     optimizer.state_dict()
        rng.pt                           torch (CPU + CUDA) and Python `random` states
        trainer.json                     step, data cursor, resolved config (written last)
        <name>.safetensors               optional extra tensors (e.g. the RL policy's EMA: `extras=`)

A checkpoint is written into `.tmp-step_N-*/` and renamed to `step_N/` only when every file is on disk,
so a `step_*` folder is complete unless the disk itself corrupted it. `load_latest` ignores temporary
folders and raises a ValueError naming any unreadable file in the newest `step_*` folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_write

_STEP_RE = re.compile(r"^step_(\d{8})$")
REQUIRED = ("trainer.json", "optimizer.pt", "rng.pt")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_json(step: int, data_state: dict, config_dict: dict) -> str:
    """`trainer.json` of a checkpoint: step, data cursor, resolved config; a clear error if any is not JSON."""
    try:
        return json.dumps({"step": int(step), "data": data_state, "config": config_dict}, indent=2)
    except TypeError as e:
        raise ValueError(f"checkpoint trainer state is not JSON-serialisable ({e}); the batches object's "
                         "state_dict() and the config must hold only numbers, strings, lists and dicts") from None


def save(out_dir, step: int, model, optimizer, data_state: dict, rng: dict, config_dict: dict,
         keep: int = 3, extras: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `out_dir/step_{step:08d}/` atomically, point `latest` at it, keep the newest `keep`.
    `extras`: name -> tensors, each written as `<name>.safetensors` inside the folder (`Checkpoint.extra`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step:08d}"
    trainer_text = trainer_json(step, data_state, config_dict)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".tmp-{final.name}-"))
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        write_extras(tmp, extras)
        (tmp / "trainer.json").write_text(trainer_text)
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it stopped)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(out_dir / "latest", final.name + "\n")
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_extras(folder: Path, extras: dict[str, dict[str, torch.Tensor]] | None) -> None:
    """`<name>.safetensors` per entry of `extras` (contiguous CPU copies; safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    for name, tensors in (extras or {}).items():
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(plain, str(Path(folder) / f"{name}.safetensors"))


def list_checkpoints(out_dir) -> list[Path]:
    """Complete (renamed) checkpoint folders, oldest first; temporary folders are skipped."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


@dataclass
class Checkpoint:
    path: Path
    step: int
    data: dict
    config: dict
    optimizer: dict
    rng: dict

    def load_model(self, model) -> None:
        """Copy this checkpoint's weights into `model` (same architecture)."""
        try:
            if (self.path / "model.pt").exists():
                state = torch.load(self.path / "model.pt", map_location="cpu", weights_only=True)
            else:
                p = next(model.parameters())
                state = type(model).from_pretrained(self.path, dtype=p.dtype).state_dict()
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{self.path}: model weights are unreadable ({type(e).__name__}: {e}); delete "
                             "this folder to resume from the previous checkpoint, or start afresh with "
                             "resume=False") from None
        model.load_state_dict(state)

    def extra(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved as `extras[name]`, or None when this checkpoint has none by that name."""
        from safetensors.torch import load_file

        f = self.path / f"{name}.safetensors"
        if not f.is_file():
            return None
        try:
            return load_file(str(f))
        except Exception as e:
            raise _corrupt(f, f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"checkpoint file {path} is {why}; delete the folder {path.parent} to resume from the "
                      "previous checkpoint, or start afresh with resume=False")


def load(path) -> Checkpoint:
    """Read one checkpoint folder (everything but the model weights, which `Checkpoint.load_model` reads)."""
    path = Path(path)
    for name in REQUIRED:
        if not (path / name).is_file():
            raise _corrupt(path / name, "missing")
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        step = int(trainer["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise _corrupt(path / "trainer.json", f"not a valid trainer state ({e})") from None
    blobs = {}
    for name in ("optimizer.pt", "rng.pt"):
        try:
            # rng.pt holds Python's random state (a tuple of ints): plain containers, safe with weights_only.
            blobs[name] = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _corrupt(path / name, f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return Checkpoint(path, step, trainer.get("data"), trainer.get("config", {}), blobs["optimizer.pt"],
                      blobs["rng.pt"])


def load_latest(out_dir) -> Checkpoint | None:
    """The newest complete checkpoint in `out_dir`, or None when there is none.

    The folder scan is the truth (a crash between the rename and the `latest` update leaves a complete
    folder that `latest` does not name yet); `latest` is for people and outside tools.
    """
    found = list_checkpoints(out_dir)
    return load(found[-1]) if found else None
