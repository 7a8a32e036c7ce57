"""The torch internals the compiled decode step leans on, in one place, checked before use.

The engine compiles its step with the public API: ``torch.compile`` once per shape, and calls of a
compiled shape under ``torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)``, which
still look the shape up in dynamo's cache. A decode step on CPU is short enough that this lookup
and inductor's checks of its inputs are a real part of it, so the engine goes further with torch
internals, used only here:

* ``torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)``: the cache entries dynamo made
  for a code object. An entry's ``code`` is the bytecode dynamo wrote for one shape (it calls the
  compiled graph); made into a plain function of the same globals (:func:`entry_function`), it
  runs that shape with no cache lookup and no guards.
* inductor's settings by name (:func:`inductor_options`, given to ``torch.compile``'s public
  ``options``; the check looks them up in ``torch._inductor.config``): ``size_asserts`` and
  ``alignment_asserts`` off (:func:`key` pins the inputs, so the wrapper need not assert their
  sizes at every call), ``cpp_wrapper`` on CPU (the code that calls the kernels is C++, not
  Python: less overhead per call), and ``triton.cudagraphs`` on CUDA (what
  ``mode="reduce-overhead"`` sets; a mode cannot be combined with options).
* ``torch._dynamo.exc.Unsupported`` (:func:`graph_break`): what ``fullgraph=True`` raises at a graph
  break, so that a step that is not one graph can be compiled in pieces instead.

:func:`usable` checks once per process that these still exist and behave on the running torch: a
small function compiled with a counting backend has exactly one cache entry, whose code, called
directly, runs the compiled graph and returns the compiled function's result; inductor has
settings of those names; the exception class exists. Where the check fails it warns once, and the
engine uses the public path only: ``torch.compile`` without options (``mode="reduce-overhead"`` on
CUDA), compiled shapes called with guard evaluation skipped, and any exception of a first compile
taken as a graph break (a real error recurs in the compile in pieces, and is raised).

A call that skips the guards, either way, is right only while nothing they check has changed, so
both are keyed by :func:`key`: the shapes, strides, dtype and device of the step's inputs, and the
global state dynamo's guards check (grad and inference mode, threads, autocast, default dtype,
deterministic algorithms). A call of another key compiles, or finds, its own cache entry.
"""

from __future__ import annotations

import types
import warnings
from typing import Callable

import torch

_verdict: tuple[str | None] | None = None  # the check's: (None,) passed, (why,) failed; None: not run


def key(ids: torch.Tensor, cache: torch.Tensor) -> tuple:
    """What a compiled step's call depends on beyond the model: the token ids' shape, the cache
    window's length and strides (another ``max_len`` changes them), dtype and device, and the global
    state that dynamo's guards would check."""
    device = cache.device.type  # dynamo guards CPU autocast whatever the device
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                device != "cpu" and torch.is_autocast_enabled(device),
                device != "cpu" and torch.get_autocast_dtype(device))
    return (*ids.shape, cache.shape[1], cache.stride(), cache.dtype, cache.device, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), torch.get_num_threads(), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(), *autocast)


def cache_entries(code: types.CodeType) -> dict[int, types.CodeType]:
    """The code objects of dynamo's cache entries for ``code``, by id."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return {id(e.code): e.code for e in _debug_get_cache_entry_list(code)}


def entry_function(code: types.CodeType, globals_: dict, name: str) -> Callable:
    """A cache entry's code as a plain function of ``globals_`` (those of the compiled function,
    where dynamo put the compiled graph): the shape it was made for, called with no lookup."""
    return types.FunctionType(code, globals_, name)


def inductor_options(device_type: str) -> dict:
    """inductor's settings for the step on a device (``torch.compile``'s ``options``)."""
    options = {"size_asserts": False, "alignment_asserts": False}
    if device_type == "cpu":
        options["cpp_wrapper"] = True
    elif device_type == "cuda":
        options["triton.cudagraphs"] = True
    return options


def graph_break() -> type[BaseException]:
    """The exception a graph break raises under ``fullgraph=True``; any exception where the
    internals are unusable."""
    if not usable():
        return Exception
    from torch._dynamo.exc import Unsupported

    return Unsupported


def usable() -> bool:
    """Whether the internals above work on the running torch (checked once; warns once if not)."""
    global _verdict
    if _verdict is None:
        _verdict = (_check(),)
        if _verdict[0]:
            warnings.warn(f"compiled decode step: torch internals unusable ({_verdict[0]}); the step uses "
                          "torch.compile's public API only (slower)", stacklevel=3)
    return _verdict[0] is None


def _probe(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * 2 + y


def _check() -> str | None:
    """None when the internals behave; otherwise what failed."""
    graphs = []

    def counting(gm, example_inputs):
        def run(*args):
            graphs.append(1)
            return gm.forward(*args)
        return run

    try:
        probe = types.FunctionType(_probe.__code__.replace(), _probe.__globals__, "_probe")
        compiled = torch.compile(probe, backend=counting, fullgraph=True, dynamic=False)
        x, y = torch.arange(4.0), torch.ones(4)
        want = compiled(x, y)
        entries = cache_entries(probe.__code__)
        if len(entries) != 1:
            return f"a compiled function has {len(entries)} cache entries, not 1"
        called = len(graphs)
        got = entry_function(next(iter(entries.values())), probe.__globals__, "_probe")(x, y)
        if len(graphs) != called + 1 or not torch.equal(got, want) or not torch.equal(want, _probe(x, y)):
            return "a cache entry's code called directly does not run its compiled graph"
        from torch._dynamo.exc import Unsupported  # noqa: F401 - that it exists
        from torch._inductor import config

        known = config.get_config_copy()
        missing = sorted({k for d in ("cpu", "cuda") for k in inductor_options(d) if k not in known})
        if missing:
            return f"inductor has no setting {', '.join(missing)}"
    except Exception as e:  # noqa: BLE001 - any failure means: use the public API
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None
