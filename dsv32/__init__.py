"""dsv32: an open reimplementation of the DeepSeek-V3.2 training system."""

from .model import Cache, ModelConfig, Trace, Transformer

__version__ = "0.1.0"
__all__ = ["Cache", "ModelConfig", "Trace", "Transformer", "__version__"]
