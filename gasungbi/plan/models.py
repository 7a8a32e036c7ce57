"""What ``--model`` names, for the planner: a preset, a Hugging Face ``config.json`` (the file or
its directory), or bare counts (``--params N --active N``).

Reading a config here needs only :mod:`gasungbi.config` (no checkpoint code, no torch): the
planner needs the architecture, never the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from gasungbi.config import ModelConfig, from_hf_config
from gasungbi.presets import PRESETS, get_preset
from gasungbi.plan.counts import CountModel, Model, parse_tokens


def model_from_spec(spec: str) -> ModelConfig:
    """A preset name, a ``config.json`` path or a directory holding one -> ModelConfig.
    ``ValueError`` naming what was tried otherwise."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), nor a config.json "
                         "file or a directory holding one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    return from_hf_config(_plannable(data))


def _plannable(d: dict) -> dict:
    """The config with what only changes RoPE frequencies dropped (Llama 3's ``llama3`` scaling
    and the like): cost and memory do not depend on it, and ``from_hf_config`` knows only YaRN."""
    out = dict(d)
    for key in ("rope_scaling", "rope_parameters"):
        scaling = out.get(key) or {}
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in (None, "default", "yarn"):
            out.pop(key)
    return out


def count_model(params: str | float, active: str | float | None = None) -> CountModel:
    """``--params 70B [--active 70B]`` (active defaults to params: a dense model)."""
    p = parse_tokens(str(params))
    a = p if active is None else parse_tokens(str(active))
    return CountModel(params=p, active=a)


def resolve(spec: str | None = None, params: str | None = None, active: str | None = None) -> Model:
    """The model a command names: ``spec`` (see :func:`model_from_spec`) or counts, not both."""
    if params is not None or active is not None:
        if spec is not None:
            raise ValueError("give --model or --params/--active, not both")
        if params is None:
            raise ValueError("--active needs --params (the total parameter count)")
        return count_model(params, active)
    if spec is None:
        raise ValueError("give --model (a preset or a config.json) or --params N [--active N]")
    return model_from_spec(spec)
