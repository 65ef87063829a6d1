"""The one metrics sink: a compact line on stdout, one JSON object per line in `metrics.jsonl`,
and TensorBoard scalars when `tensorboard` is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _echo(line: str) -> None:
    try:  # keeps a running tqdm bar intact
        from tqdm import tqdm
        tqdm.write(line)
    except ImportError:
        print(line, flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)


class Metrics:
    def __init__(self, out_dir: str | Path, echo: bool = True, tensorboard: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._file = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                import tensorboard  # noqa: F401  (SummaryWriter needs the package, not only torch's shim)
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:
                pass

    def log(self, step: int, values: dict) -> None:
        values = {k: (float(v) if hasattr(v, "item") else v) for k, v in values.items()}
        record = {"step": int(step), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                         for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.echo:
            _echo(f"step {step:>6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
