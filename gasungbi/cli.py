"""The ``gasungbi`` command: one subcommand per job, each a thin wrapper over a library function.

``COMMANDS`` maps each name to ``"module:function"``; a module is imported only when its command
runs, so ``gasungbi --help`` is fast and imports no torch.
Errors a user can fix (bad paths, bad presets, bad checkpoints) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from gasungbi.errors import UserError

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


# ---------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------

def _params(args: argparse.Namespace) -> int:
    from gasungbi.model.accounting import count_params, format_params
    from gasungbi.model.transformer import build_model

    from gasungbi.config import resolve_model_config

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


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

# name -> ("module:function", one-line help). Each function takes the parsed arguments and returns
# an exit code; its ``add_args(parser)`` attribute adds its flags. Modules are imported only for the
# command that runs (and for ``COMMAND --help``), so ``gasungbi --help`` imports no torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("gasungbi.cli:_info", "versions, device, CPU capability and threads"),
    "params": ("gasungbi.cli:_params", "parameter accounting (total and activated, by component) of a preset or checkpoint"),
    "speedrun": ("gasungbi.pipeline:speedrun_cmd",
                 "the whole pipeline: tokenizer, shards, pretraining, SFT, GRPO, report, checkpoint"),
    "prepare": ("gasungbi.train.commands:prepare", "build a tokenizer and token shards from a corpus"),
    "train": ("gasungbi.train.commands:train_cmd", "pretrain a model on token shards (works under torchrun for DDP/FSDP2)"),
    "sft": ("gasungbi.post.commands:sft", "chat SFT on OpenAI-format conversations (JSONL); loss on assistant tokens only"),
    "grpo": ("gasungbi.post.commands:grpo_cmd",
             "reinforcement learning with verifiable rewards (GRPO / Dr. GRPO) on the reasoning gym"),
    "distill": ("gasungbi.post.commands:distill_cmd",
                "sample reasoning traces from a teacher, keep the rewarded ones, SFT a student on them"),
    "eval-tasks": ("gasungbi.post.commands:eval_tasks_cmd",
                   "held-out accuracy on the reasoning gym: pass@1 (greedy) and pass@k"),
    "generate": ("gasungbi.infer.commands:_generate",
                 "generate text from a checkpoint (batched prompts, sampling, stop strings, speculative)"),
    "chat": ("gasungbi.infer.commands:_chat", "multi-turn chat with a checkpoint, streaming (/reset, /quit)"),
    "quantize": ("gasungbi.infer.commands:_quantize",
                 "weight-only int8/int4 quantization of a checkpoint, saved for generate/chat"),
    "serve": ("gasungbi.serve.commands:_serve",
              "OpenAI-compatible HTTP server with continuous batching, streaming and a chat page"),
    "plan": ("gasungbi.plan.commands:_plan", "hardware and cost planner: plan train | serve | here | model | backtest"),
}


def _target(name: str):
    import importlib

    module, fn = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), fn)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (None: none, for the overview)."""
    parser = argparse.ArgumentParser(
        prog="gasungbi",
        description="Train, post-train, evaluate, quantize and serve DeepSeek-style models (MLA, DeepSeekMoE, "
                    "MTP) on the hardware you have, and know what it costs before you spend.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(_target(name), "add_args", lambda p: None)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    from gasungbi.config import CheckpointError

    try:
        return _target(args.command)(args)
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
