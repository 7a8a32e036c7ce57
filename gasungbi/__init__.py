"""gasungbi (가성비): train, post-train, evaluate, quantize and serve DeepSeek-style models on the
hardware you have, and know what it will cost before you spend."""

__version__ = "0.1.0"

from gasungbi.config import ModelConfig, get_preset  # noqa: E402
from gasungbi.interop.hf import load_model, save_model  # noqa: E402
from gasungbi.model.transformer import Transformer, build_model  # noqa: E402

__all__ = ["ModelConfig", "Transformer", "build_model", "get_preset", "load_model", "save_model", "__version__"]
