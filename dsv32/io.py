"""Files written whole or not at all, JSON Lines read with errors that name the line, figures saved.

Every writer goes through `atomic_write`: a temporary file in the target's folder, then `os.replace`,
so a reader (or a run killed mid-write) sees the old file or the new one, never half of one.

    write_json(run / "report.json", report)
    rows = read_jsonl("data/records.jsonl")        # ValueError "data/records.jsonl:7: invalid JSON (...)"
    plt = pyplot()                                  # None when matplotlib is not installed
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


def atomic_write(path, data: str | bytes | Callable[[str], None]) -> Path:
    """Write `data` (text, bytes, or a function that writes the file at the path it is given) to `path`
    atomically; the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        elif isinstance(data, bytes):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, obj, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path, records: Iterable[dict]) -> Path:
    """One JSON object per line."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def iter_jsonl(path, required: tuple[str, ...] = (), example: str = '{"text": "..."}') -> Iterator[tuple[str, dict]]:
    """(`path:line`, object) for every JSON object line of `path`, blank lines skipped. A line that is not a
    JSON object, or lacks one of the `required` keys, is a ValueError naming `path:line` and what a good
    line looks like; callers use the location for their own checks of the values."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                                 f"JSON object such as {example}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}; each line must be "
                                 f"one JSON object such as {example}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{where}: missing key {missing[0]!r} (got keys {sorted(row)}); each line must "
                                 f"look like {example}")
            yield where, row


def read_jsonl(path, required: tuple[str, ...] = (), example: str = '{"text": "..."}') -> list[dict]:
    """Every JSON object line of `path` (errors as in `iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path, required, example)]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed
    (plots are optional: reports still get their JSON and Markdown)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Lay out, save atomically as PNG, close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return Path(path)
