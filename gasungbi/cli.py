"""The ``gasungbi`` command: one subcommand per job, each a thin wrapper over a library function.

Heavy modules are imported inside the subcommand that needs them, so ``gasungbi --help`` is fast.
Errors a user can fix (bad paths, bad presets, bad checkpoints) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> exit code`` as subcommand ``name``; ``fn.add_args(parser)`` adds its flags."""

    def wrap(fn):
        COMMANDS[name] = (help, getattr(fn, "add_args", lambda p: None), fn)
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------

def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import gasungbi

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "not installed (pip install 'gasungbi[hf]')"
    cuda = torch.cuda.is_available()
    rows = {
        "gasungbi": gasungbi.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)",
        "cuda devices": torch.cuda.device_count() if cuda else 0,
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "cpu threads": torch.get_num_threads(),
        "bf16 on cpu": "fast (AVX512-BF16/AMX)" if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
        else "slow: train in fp32 on this CPU",
    }
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(map(len, rows))
        for k, v in rows.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


_info.add_args = _info_args
command("info", "versions, device, CPU capability and threads")(_info)


# ---------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------

def _params(args: argparse.Namespace) -> int:
    from gasungbi.model.accounting import count_params, format_params
    from gasungbi.model.transformer import build_model

    cfg = resolve_model_config(args.model)
    # Build the real module tree on the meta device (no memory) and check the formula against it.
    model = build_model(cfg, device="meta")
    built = sum(p.numel() for p in model.parameters())
    pc = count_params(cfg)
    if args.json:
        print(json.dumps({"model": args.model, "components": pc.components, "mtp": pc.mtp, "total": pc.total,
                          "activated": pc.activated, "total_with_mtp": pc.total_with_mtp,
                          "built_on_meta": built}, indent=2))
        return 0
    print(f"{args.model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})" if cfg.is_mla else
          f"{args.model}: dense {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}")
    print(format_params(cfg))
    print(f"built on the meta device: {built:,} parameters (formula: {pc.total_with_mtp:,})")
    return 0


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset name (gasungbi params --list) or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON")


_params.add_args = _params_args
command("params", "parameter accounting (total and activated, by component) of a preset or checkpoint")(_params)


def resolve_model_config(spec: str):
    """A preset name or a Hugging Face checkpoint directory -> ModelConfig."""
    from pathlib import Path

    from gasungbi.config import PRESETS, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    if Path(spec).exists():
        from gasungbi.interop.hf import read_config
        return read_config(spec)
    raise UserError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}) nor an existing directory")


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

# Modules that register more subcommands with @command; each keeps its heavy imports inside the
# command functions so that importing it is cheap.
COMMAND_MODULES: tuple[str, ...] = (
    "gasungbi.train.commands",
    "gasungbi.plan.commands",
    "gasungbi.post.commands",
    "gasungbi.infer.commands",
    "gasungbi.serve.commands",
)


def _load_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="gasungbi",
        description="Train, post-train, evaluate, quantize and serve DeepSeek-style models (MLA, DeepSeekMoE, "
                    "MTP) on the hardware you have, and know what it costs before you spend.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    from gasungbi.interop.hf import CheckpointError

    try:
        return COMMANDS[args.command][2](args)
    except (UserError, CheckpointError, FileNotFoundError) as e:
        print(f"gasungbi {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gasungbi {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gasungbi params ... | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
