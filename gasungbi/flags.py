"""Types that command signatures share, which tyro turns into flags and positional arguments.

A positional argument shows its metavar in ``--help`` and in errors (``CKPT``, not ``STR``); a config
dataclass marked :data:`Flat` gives top-level flags (``--lr``, not ``--cfg.lr``).
"""

from __future__ import annotations

from typing import Annotated

from tyro.conf import OmitArgPrefixes, Positional, UseAppendAction, arg

Flat = OmitArgPrefixes
"""A config dataclass whose fields are top-level flags."""

Checkpoint = Annotated[Positional[str], arg(metavar="CKPT")]
"""A Hugging Face-layout checkpoint directory (config.json, safetensors, tokenizer.json)."""

RunOrStep = Annotated[Positional[str], arg(metavar="RUN_OR_STEP")]
"""A run directory (its latest checkpoint) or one of its ``step_N`` checkpoint directories."""

Model = Annotated[Positional[str], arg(metavar="MODEL")]
"""A preset name or a checkpoint directory."""

OutDir = Annotated[Positional[str], arg(metavar="OUT")]
"""A directory to write."""

Repeated = Annotated[tuple[str, ...], UseAppendAction]
"""A flag given once per value (``--stop A --stop B``)."""
