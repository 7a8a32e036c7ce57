"""CLI: ``gasungbi export`` (a checkpoint for another engine: GGUF for llama.cpp and Ollama)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from gasungbi.errors import UserError, require_checkpoint_dir
from gasungbi.flags import Checkpoint


def export_cmd(checkpoint: Checkpoint, out: str, format: Literal["gguf"] = "gguf",
               dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32", overwrite: bool = False) -> int:
    """Export a checkpoint for another engine: a GGUF file that llama.cpp and Ollama run (architecture
    deepseek2 for MLA/MoE models, llama for dense ones; the tokenizer and chat template inside), and an
    Ollama Modelfile beside it.

    Args:
        checkpoint: a Hugging Face-layout checkpoint directory with its tokenizer.json
        out: the file to write, e.g. model.gguf
        format: gguf
        dtype: type of the matrices: f32, f16, bf16 or q8_0 (vectors, the router and MLA's per-head factors stay float)
        overwrite: replace an existing --out file and the Modelfile written for it
    """
    from gasungbi.interop.gguf import export_gguf, modelfile_path
    from gasungbi.outputs import output_file

    require_checkpoint_dir(checkpoint)
    path = output_file(out, "--out", overwrite)
    if path.exists() and path.suffix != ".gguf" and Path(checkpoint).resolve() in path.resolve().parents:
        raise UserError(f"--out {out} is a file of the checkpoint {checkpoint}; choose another path")
    if (modelfile := modelfile_path(path)).exists() and not overwrite:
        raise UserError(f"{modelfile} (the Ollama Modelfile for --out {out}) already exists: add --overwrite to "
                        "replace it, or choose another path")
    try:
        export_gguf(checkpoint, out, dtype, progress=lambda s: print(s, file=sys.stderr))
    except ValueError as e:  # GGUFExportError, or a tokenizer file the conventions cannot read
        raise UserError(str(e)) from None
    return 0
