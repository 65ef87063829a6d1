"""Scale-out: torchrun + FSDP2, distributed checkpoints that reshard, consolidated Hugging Face export.

    torchrun --nproc-per-node 2 -m dsv32 pretrain --preset tiny --batch-size 8 --out runs/pt2
    torchrun --nproc-per-node 2 -m dsv32 sft --init-from DIR --out runs/sft2     # also distill train, rl

Parallelism is applied to a built model from outside the model code (`parallel.py`); checkpoints go
through `checkpoint.py`. Trainers consult `current()` (rank, world size, device, `shard`, `mean`, `sum`,
`any`, `is_main`) instead of reading rank globals; in a single process every helper is a no-op.
`global_mean` turns a rank's sum into its share of the global batch's mean (SFT's loss), `mean_logs`
combines logs whose keys differ by rank, and RL's data parallelism lives in `dsv32.rl.distributed`.
"""

from . import checkpoint
from .checkpoint import copy_weights, export_hf, full_state_dict, load_dcp, restore, save_dcp
from .parallel import (DistContext, apply_ac, apply_fsdp, bf16_policy, check_ready, current, global_mean, init,
                       is_sharded, mean_logs, parallelize, session, shutdown)


class NullMetrics:
    """The metrics sink of ranks other than 0: accepts everything, writes nothing."""

    def log(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullMetrics":
        return self

    def __exit__(self, *exc) -> None:
        pass


__all__ = ["DistContext", "NullMetrics", "apply_ac", "apply_fsdp", "bf16_policy", "check_ready", "checkpoint",
           "copy_weights", "current", "export_hf", "full_state_dict", "global_mean", "init", "is_sharded",
           "load_dcp", "mean_logs", "parallelize", "restore", "save_dcp", "session", "shutdown"]
