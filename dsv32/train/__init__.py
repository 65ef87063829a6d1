"""Training: one generic loop (`loop.train`) plus the pieces it is built from.

Stage modules (pretrain, DSA dense warm-up, sparse training, SFT) pass only what differs: which
parameter groups train (`ParamGroup`), which loss (`loss_fn`), which attention mode.
"""

from .checkpoint import Checkpoint, load_latest
from .loop import lm_loss, train
from .metrics import Metrics
from .optim import ParamGroup, TrainConfig, build_optimizer, clip_grads, lr_factor, set_lr

__all__ = ["Checkpoint", "Metrics", "ParamGroup", "TrainConfig", "build_optimizer", "clip_grads", "load_latest",
           "lm_loss", "lr_factor", "set_lr", "train"]
