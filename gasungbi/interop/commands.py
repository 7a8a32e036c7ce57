"""CLI: ``gasungbi export`` (a checkpoint for another engine: GGUF for llama.cpp and Ollama)."""

from __future__ import annotations

import sys
from typing import Literal

from gasungbi.errors import UserError
from gasungbi.flags import Checkpoint


def export_cmd(checkpoint: Checkpoint, out: str, format: Literal["gguf"] = "gguf",
               dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32") -> int:
    """Export a checkpoint for another engine: a GGUF file that llama.cpp and Ollama run (architecture
    deepseek2 for MLA/MoE models, llama for dense ones; the tokenizer and chat template inside), and an
    Ollama Modelfile beside it.

    Args:
        checkpoint: a Hugging Face-layout checkpoint directory with its tokenizer.json
        out: the file to write, e.g. model.gguf
        format: gguf
        dtype: type of the matrices: f32, f16, bf16 or q8_0 (vectors, the router and MLA's per-head factors stay float)
    """
    from gasungbi.interop.gguf import GGUFExportError, export_gguf

    try:
        export_gguf(checkpoint, out, dtype, progress=lambda s: print(s, file=sys.stderr))
    except GGUFExportError as e:
        raise UserError(str(e)) from None
    return 0
