"""The DeepSeek-V3.2 model: MLA + DeepSeekMoE + lightning indexer and top-k sparse attention."""

from .cache import Cache
from .config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from .transformer import Trace, Transformer

__all__ = ["Cache", "IndexerConfig", "MLAConfig", "ModelConfig", "MoEConfig", "RopeConfig", "Trace", "Transformer"]
