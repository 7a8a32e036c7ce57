"""CLI: ``gasungbi prepare`` (corpus -> tokenizer + shards) and ``gasungbi train``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from gasungbi.errors import UserError
from gasungbi.train.trainer import TrainConfig

# Help for each TrainConfig field; the flags are generated from the dataclass (--batch-size ...).
TRAIN_HELP = {
    "data": "shard directory made by `gasungbi prepare` (holds manifest.json and tokenizer.json)",
    "out_dir": "run directory: checkpoints, metrics.jsonl, loss.png, report.json",
    "model": "model preset (see `gasungbi params --help`); vocab_size follows the tokenizer",
    "batch_size": "sequences per micro-batch, all processes together",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps of the whole run (the schedule's horizon)",
    "optimizer": "adamw or muon (Muon for hidden matrices + AdamW for the rest)",
    "lr": "AdamW peak learning rate",
    "muon_lr": "Muon peak learning rate",
    "warmup_steps": "linear warmup steps",
    "schedule": "cosine or wsd (warmup-stable-decay)",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "decay_frac": "wsd: fraction of the steps spent decaying",
    "bias_update_speed": "gamma of auxiliary-loss-free balancing (0 disables)",
    "balance_alpha": "alpha of the sequence-wise balance loss (0 disables)",
    "mtp_weight": "lambda, the weight of the multi-token-prediction loss",
    "eval_interval": "steps between validations (0: only at the end)",
    "eval_batches": "validation batches per evaluation",
    "sample_interval": "steps between sample generations (0: only at the end)",
    "sample_prompt": "prompt of the sample generations",
    "ckpt_interval": "steps between checkpoints (one is always written at the end)",
    "keep_checkpoints": "how many checkpoints to keep",
    "log_interval": "steps between metrics.jsonl rows",
    "tensorboard": "also log to out_dir/tb (needs the tensorboard package)",
    "device": "auto, cpu, cuda or cuda:N",
    "compile": "torch.compile the training step",
    "parallel": "under torchrun: ddp or fsdp (FSDP2 fully_shard)",
    "price_per_hour": "dollars per device-hour for the cost meter (default: catalog price, or 0.05 on CPU)",
    "seed": "seed of initialization and data order",
    "resume": "continue from the newest checkpoint in out_dir",
    "stop_after": "stop (with a checkpoint) after this step, keeping the max_steps schedule",
}


def add_train_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip or f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
        help_text = TRAIN_HELP.get(f.name, "")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {default})")
        else:
            typ = kind or (float if f.name == "price_per_hour" else int if f.name == "stop_after" else str)
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set num_hidden_layers=2 (repeatable)")
    p.add_argument("--config", help="a JSON or TOML file of training fields; flags given here override it")


def train_config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """defaults <- base <- --config file <- explicit flags."""
    values = dataclasses.asdict(base or TrainConfig())
    if getattr(args, "config", None):
        values.update(_read_config_file(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    overrides = dict(values.get("model_overrides") or {})
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    values["model_overrides"] = overrides
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown training field(s) {sorted(unknown)}; known: {sorted(names)}")
    return TrainConfig(**values)


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        if p.suffix == ".toml":
            import tomllib
            return tomllib.loads(p.read_text())
        return json.loads(p.read_text())
    except Exception as e:
        raise UserError(f"config file {path}: {e}") from None


# ---------------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace) -> int:
    from gasungbi.data.prepare import prepare_corpus
    prepare_corpus(args.corpus, args.out, vocab_size=args.vocab_size, tokenizer_bytes=args.tokenizer_bytes,
                   max_bytes=args.max_bytes, text_field=args.text_field, val_fraction=args.val_fraction)
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="stdlib",
                   help="stdlib (default), a file, folder or glob, a .jsonl/.parquet file, or hf:NAME[:SPLIT[:CONFIG]]")
    p.add_argument("--out", required=True, help="output directory for tokenizer.json, shards and manifest.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    p.add_argument("--tokenizer-bytes", type=int, default=20_000_000,
                   help="train the tokenizer on the first N bytes of the corpus (default 20M)")
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet/HF sources")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")


prepare.add_args = _prepare_args


def train_cmd(args: argparse.Namespace) -> int:
    from gasungbi.train.trainer import train
    tc = train_config_from_args(args)
    try:
        report = train(tc)
    except ValueError as e:
        raise UserError(str(e)) from None
    if report.get("checkpoint") is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    if report.get("val_bpb") is not None:
        print(f"step {report['step']}: val loss {report['val_loss']:.4f}, {report['val_bpb']:.4f} bits/byte, "
              f"{report['tokens_per_s']:,.0f} tokens/s, MFU {report['mfu']:.2%}, ${report['dollars']:.4f}")
    print(f"checkpoint: {report['checkpoint']}")
    return 0


train_cmd.add_args = add_train_flags
