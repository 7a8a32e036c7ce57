"""The ``gasungbi`` command: a table of subcommands, each a typed library function.

``COMMANDS`` maps a name to ``"module:function"`` (litgpt's ``__main__`` style). The function's
signature is the flags' schema and its docstring (``Args:``) their help; config dataclasses document
their fields with attribute docstrings or comments, and tyro turns all of it into the parser
(``--batch-size``, ``--compile/--no-compile``...). A command's module is imported only when the
command runs, so ``gasungbi --help`` is fast and imports no torch. A function whose parameter ``cfg``
is a config dataclass and which has a ``config`` parameter reads ``--config FILE`` (JSON or TOML) as
the defaults that the flags then override. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import contextlib
import sys
import typing

from gasungbi.errors import UserError

# name -> ("module:function", one-line summary). A target that is a dict of functions is a group of
# subcommands (``gasungbi plan train``).
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("gasungbi.model.commands:info", "versions, device, CPU capability and threads"),
    "params": ("gasungbi.model.commands:params",
               "parameter accounting (total and activated, by component) of a preset or checkpoint"),
    "speedrun": ("gasungbi.pipeline:speedrun_cmd",
                 "the whole pipeline: tokenizer, shards, pretraining, SFT, GRPO, report, checkpoint"),
    "prepare": ("gasungbi.data.commands:prepare", "build a tokenizer and token shards from a corpus"),
    "train": ("gasungbi.train.commands:train_cmd", "pretrain a model on token shards (works under torchrun for DDP/FSDP2)"),
    "sft": ("gasungbi.post.commands:sft", "chat SFT on OpenAI-format conversations (JSONL); loss on assistant tokens only"),
    "grpo": ("gasungbi.post.commands:grpo_cmd",
             "reinforcement learning with verifiable rewards (GRPO / Dr. GRPO) on the reasoning gym"),
    "distill": ("gasungbi.post.commands:distill_cmd",
                "sample reasoning traces from a teacher, keep the rewarded ones, SFT a student on them"),
    "eval": ("gasungbi.eval.commands:eval_cmd",
             "lm-evaluation-harness tasks on gasungbi's engine (offline; needs gasungbi[eval])"),
    "eval-gym": ("gasungbi.eval.commands:eval_gym_cmd",
                 "held-out accuracy on the reasoning gym: pass@1 (greedy) and pass@k"),
    "eval-tasks": ("gasungbi.eval.commands:eval_gym_cmd", "alias of eval-gym"),
    "generate": ("gasungbi.infer.commands:generate_cmd",
                 "generate text from a checkpoint (batched prompts, sampling, stop strings, speculative)"),
    "chat": ("gasungbi.infer.commands:chat_cmd", "multi-turn chat with a checkpoint, streaming (/reset, /quit)"),
    "quantize": ("gasungbi.eval.commands:quantize_cmd",
                 "weight-only int8/int4 quantization of a checkpoint, saved for generate/chat"),
    "serve": ("gasungbi.serve.commands:serve_cmd",
              "OpenAI-compatible HTTP server with continuous batching, streaming and a chat page"),
    "export-hf": ("gasungbi.train.commands:export_hf_cmd",
                  "a training checkpoint (sharded under torchrun) in the Hugging Face layout"),
    "export": ("gasungbi.interop.commands:export_cmd",
               "export a checkpoint for llama.cpp and Ollama (GGUF, with an Ollama Modelfile)"),
    "plan": ("gasungbi.plan.commands:PLAN", "hardware and cost planner: plan train | serve | here | model | backtest"),
}

DESCRIPTION = ("Train, post-train, evaluate, quantize and serve DeepSeek-style models (MLA, DeepSeekMoE, MTP) on "
               "the hardware you have, and know what it costs before you spend.")


def _target(name: str):
    import importlib

    module, attr = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def _overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: gasungbi COMMAND [FLAGS]   (gasungbi COMMAND --help for its flags)\n\n{DESCRIPTION}\n\n"
            f"commands:\n{rows}\n")


def read_config_file(path: str) -> dict:
    """The fields of a JSON or TOML config file (``--config FILE``); a bad file is a UserError."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error of the user's file
        raise UserError(f"--config {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a table of fields, got {type(data).__name__}")
    return data


def _with_config_file(fn, argv: list[str]):
    """``fn`` with its ``cfg`` default replaced by ``--config FILE``'s values, when given."""
    import dataclasses
    import functools
    import inspect

    params = inspect.signature(fn).parameters
    if "cfg" not in params or "config" not in params:
        return fn
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return fn
    base = params["cfg"].default
    values = read_config_file(path)
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"--config {path}: unknown field(s) {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(type(base))
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise UserError(f"--config {path}: {name} must be {_describe(hints[name])}, got {value!r}")
    return functools.partial(fn, cfg=dataclasses.replace(base, **values))


def _fits(value, hint) -> bool:
    """Whether a config file's ``value`` has the type of the field annotated ``hint`` (JSON and TOML
    give ints, floats, strings, booleans, lists, tables and null); a type not known here passes."""
    import types

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def _describe(hint) -> str:
    """A field's type as a config file's author reads it: ``float``, ``int or null``, ``one of 'a', 'b'``."""
    import types

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is type(None):
        return "null"
    if origin is not None:
        return {dict: "a table", list: "a list", tuple: "a list"}.get(origin, str(hint))
    return {dict: "a table", list: "a list", tuple: "a list", int: "an integer", float: "a number",
            str: "a string", bool: "true or false"}.get(hint, getattr(hint, "__name__", str(hint)))


@contextlib.contextmanager
def _one_line_parse_errors(prog: str):
    """Turn tyro's parse errors (a box of several lines) into one-line UserErrors naming the flag.

    Uses tyro's parse-error hook (``tyro._errors``, marked unstable; tyro is pinned to 1.0.x in
    pyproject.toml); without it tyro prints its own box, still exit code 2."""
    try:
        from tyro import _errors as E
    except ImportError:  # pragma: no cover - another tyro
        yield
        return

    def flag(arg) -> str:
        try:
            names = arg.lowered.name_or_flags
        except AttributeError:
            return "an argument"
        if names and names[0].startswith("-"):
            return "/".join(names)
        metavar = getattr(arg.lowered, "metavar", None)  # a positional: its metavar (CKPT)
        return metavar if isinstance(metavar, str) and metavar.isupper() else \
            (names[0] if names else "argument").split(".")[-1].upper()

    def hook(event) -> None:
        if isinstance(event, E.InstantiationFailure):
            where = flag(event.argument) if event.argument is not None else "a value"
            # tyro lists one error per type it tried ("- <class 'int'>: invalid literal ..."): keep the last
            last = [line.strip(" -") for line in event.message.splitlines() if line.strip()][-1]
            raise UserError(f"{where}: {last.split('>: ', 1)[-1]}")
        if isinstance(event, E.InvalidChoice):
            raise UserError(f"{flag(event.argument)}: invalid choice {event.value!r} "
                            f"(choose from {', '.join(event.choices)})")
        if isinstance(event, E.BadValue):
            got = f" {event.offending_value!r}" if event.offending_value is not None else ""
            raise UserError(f"{flag(event.argument)}: bad value{got} ({event.reason.replace('_', ' ')})")
        if isinstance(event, E.UnrecognizedArgs):
            raise UserError(f"unrecognized arguments: {' '.join(event.tokens)} (see {prog} --help)")
        if isinstance(event, E.MissingArgs):
            names = ", ".join(flag(a.arg) for a in event.missing_arguments)
            raise UserError(f"missing required argument(s): {names} (see {prog} --help)")
        if isinstance(event, E.MissingSubcommand):
            raise UserError(f"choose a subcommand (see {prog} --help)")

    with E.on_parse_error(hook):
        yield


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gasungbi: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import tyro

    from gasungbi.config import CheckpointError

    prog = f"gasungbi {name}"
    try:
        target = _target(name)
        with _one_line_parse_errors(prog):
            if isinstance(target, dict):
                return tyro.extras.subcommand_cli_from_dict(target, args=rest, prog=prog,
                                                            description=COMMANDS[name][1]) or 0
            return tyro.cli(_with_config_file(target, rest), args=rest, prog=prog) or 0
    except (UserError, CheckpointError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or tyro's own exit
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gasungbi params ... | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
