"""gasungbi (가성비): train, post-train, evaluate, quantize and serve DeepSeek-style models on the
hardware you have, and know what it will cost before you spend.

``import gasungbi`` is light (no torch): the names below are imported when first used.
"""

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "gasungbi.config", "get_preset": "gasungbi.presets",
    "load_model": "gasungbi.interop.hf", "save_model": "gasungbi.interop.hf",
    "Transformer": "gasungbi.model.transformer", "build_model": "gasungbi.model.transformer",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gasungbi' has no attribute {name!r}")
