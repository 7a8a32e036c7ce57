"""The ``gasungbi plan`` flags turned into planner inputs: numbers checked against their range,
token counts, the hardware catalog, the model and an unlisted accelerator. A wrong flag is a
one-line :class:`~gasungbi.errors.UserError` that names it. Importing this module is cheap."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from gasungbi.errors import UserError


def check(value, flag: str, lo: float | None = None, hi: float | None = None, default=None):
    """``value`` (``default`` when None), or a one-line UserError naming ``flag`` when out of range."""
    if value is None:
        return default
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise UserError(f"{flag}: must be {bounds}, got {value!r}")
    return value


def tokens(text: str) -> float:
    """``--tokens``: ``"14.8T"``, ``"500B"`` ... -> a token count."""
    from gasungbi.plan.counts import parse_tokens

    try:
        return parse_tokens(text)
    except ValueError as e:
        raise UserError(f"--tokens: {e}") from None


def catalog(args: SimpleNamespace):
    """The shipped catalog with the user's and ``--catalog`` files applied."""
    from gasungbi.plan.catalog import load_catalog

    return load_catalog(args.catalog)


def gives_counts(args: SimpleNamespace) -> bool:
    """Whether the model is given by ``--params/--active`` counts."""
    return args.params is not None or args.active is not None


def model(spec: Any, args: SimpleNamespace | None = None):
    """A preset name, config.json path or Hugging Face config dict -> ModelConfig; or the
    ``--params/--active`` counts of ``args`` -> CountModel."""
    from gasungbi.plan.models import resolve

    if isinstance(spec, dict):
        from gasungbi.config import from_hf_config

        return from_hf_config(spec)
    params, active = getattr(args, "params", None), getattr(args, "active", None)
    if spec is None and params is None and active is None:
        raise UserError("no model: pass --model (or --params N [--active N])")
    return resolve(spec, params, active)


def accelerator(args: SimpleNamespace):
    """``--peak-tflops X --bandwidth Y [--memory Z]`` -> a Gpu, or None when not given."""
    if getattr(args, "peak_tflops", None) is None and getattr(args, "bandwidth", None) is None:
        if getattr(args, "memory", None) is not None:
            raise UserError("--memory goes with --peak-tflops and --bandwidth")
        return None
    if args.peak_tflops is None or args.bandwidth is None:
        raise UserError("an unlisted accelerator needs both --peak-tflops and --bandwidth")
    if args.hardware:
        raise UserError("give --hardware or --peak-tflops/--bandwidth, not both")
    from gasungbi.plan.catalog import custom_gpu

    return custom_gpu(check(args.peak_tflops, "--peak-tflops", lo=1e-9),
                      check(args.bandwidth, "--bandwidth", lo=1e-9),
                      check(args.memory, "--memory", lo=1e-9), getattr(args, "price", None) and
                      check(args.price, "--price", lo=0.0))
