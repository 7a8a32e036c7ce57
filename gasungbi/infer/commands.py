"""CLI: ``gasungbi generate`` and ``gasungbi chat``.

:class:`ModelArgs` (the checkpoint and where it runs) is shared with ``gasungbi serve``; heavy imports
stay inside the functions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import OmitArgPrefixes, UseAppendAction

from gasungbi.errors import UserError, require_checkpoint_dir
from gasungbi.flags import Checkpoint


@dataclass
class ModelArgs:
    """A checkpoint and how to run it: device, dtype, quantization, placement of the experts."""

    checkpoint: Checkpoint
    """a Hugging Face-layout checkpoint directory (gasungbi's, transformers', or one written by gasungbi quantize)"""
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1 ...
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: bfloat16 on CUDA, the checkpoint's on CPU
    quant: Literal["int8", "int4"] | None = None  # quantize the weights on load (weight-only; gasungbi quantize saves them)
    group_size: int = 128  # int4 group size
    experts_device: str | None = None  # keep routed experts here (e.g. cpu: system RAM), the rest on --device
    compile: bool = False  # compile the decode step (torch.compile: seconds per batch shape, then faster steps)

    def load(self):
        """The model (memory per device reported on stderr first); a bad checkpoint or device is a
        :class:`UserError`."""
        import torch

        from gasungbi.infer.load import load_for_inference

        dtype = getattr(torch, self.dtype) if self.dtype else None
        if self.device != "auto" and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: no CUDA device on this machine")
        try:
            return load_for_inference(self.checkpoint, self.device, dtype, self.quant, self.group_size,
                                      self.experts_device, report=lambda s: print(s, file=sys.stderr))
        except (ValueError, RuntimeError) as e:
            raise UserError(str(e)) from None


@dataclass
class SamplingArgs:
    """How tokens are drawn, and when generation stops."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set with this probability
    min_p: float = 0.0  # drop tokens below min_p x the top probability
    repetition_penalty: float = 1.0  # divide the logits of tokens already seen (CTRL's penalty)
    seed: int | None = None  # seed the sampler (reproducible runs)
    stop: Annotated[tuple[str, ...], UseAppendAction] = ()  # a stop string
    speculative: bool = False  # draft with the model's MTP module (self-speculative; greedy output unchanged)
    stats: bool = False  # print tokens/s (and the draft acceptance rate) to stderr

    def params(self):
        from gasungbi.infer.sampling import SamplingParams

        try:
            return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                                  repetition_penalty=self.repetition_penalty, seed=self.seed)
        except ValueError as e:
            raise UserError(str(e)) from None


Flat = OmitArgPrefixes


def tokenizer_for(path: str, required: bool):
    """The checkpoint's tokenizer; without tokenizer.json, None or (``required``) a UserError."""
    from gasungbi.data.tokenizer import load_tokenizer

    require_checkpoint_dir(path)
    if (Path(path) / "tokenizer.json").exists():
        try:
            return load_tokenizer(path)
        except ValueError as e:  # a garbage, empty or {} tokenizer.json: the message names the file
            raise UserError(str(e)) from None
    if required:
        raise UserError(f"{path} has no tokenizer.json")
    return None


def conventions_for(path: str, required: bool):
    """The checkpoint's tokenizer with its chat template and stops
    (:class:`~gasungbi.data.conventions.Conventions`); without tokenizer.json, None or (``required``) a
    UserError."""
    from gasungbi.data.conventions import Conventions

    require_checkpoint_dir(path)
    if not (Path(path) / "tokenizer.json").exists():
        if required:
            raise UserError(f"{path} has no tokenizer.json")
        return None
    _check_eos(Path(path))
    try:
        return Conventions.load(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_eos(path: Path) -> None:
    """A :class:`UserError` naming the file when the ``eos_token_id`` the stops are read from
    (generation_config.json's, else config.json's) is not a token id or a list of them."""
    import json

    for name in ("generation_config.json", "config.json"):
        try:
            d = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing or not JSON: the loaders name the problem
            continue
        if not isinstance(d, dict) or "eos_token_id" not in d:
            continue
        v = d["eos_token_id"]
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise UserError(f"{path / name}: eos_token_id must be a token id or a list of token ids, got {v!r}")
        return


def _print_stats(stats) -> None:
    line = (f"[{stats.new_tokens} tokens: prefill {stats.prefill_s * 1e3:.0f} ms, decode "
            f"{stats.decode_tokens_per_s:.1f} tokens/s")
    if stats.compile_s:
        n = stats.compile_steps
        line += f" (not counting {n} step{'s' if n != 1 else ''} that compiled: {stats.compile_s:.1f} s)"
    if stats.drafted:
        line += f", draft acceptance {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.drafted})"
    print(line + "]", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def generate_cmd(model: Annotated[ModelArgs, Flat], sampling: Annotated[SamplingArgs, Flat] = SamplingArgs(),
                 prompt: Annotated[tuple[str, ...], UseAppendAction] = (),
                 prompt_ids: Annotated[tuple[str, ...], UseAppendAction] = (),
                 bos: bool = True, max_new_tokens: int = 128, report: str | None = None) -> int:
    """Generate text from a checkpoint: batched prompts, sampling, stop strings, speculative decoding.

    Args:
        model: the checkpoint and where it runs
        sampling: sampling and stops
        prompt: a text prompt (repeat for a batch)
        prompt_ids: a prompt as token ids, e.g. 0,17,42 (for checkpoints without a tokenizer)
        bos: add the special tokens the tokenizer's own rule puts around text (<|bos|> for gasungbi's; --no-bos: none)
        max_new_tokens: tokens to generate at most
        report: write the run's decode speed, sizes, weights and machine as JSON to this file (gasungbi plan backtest --decode FILE predicts it)
    """
    from gasungbi.infer.generate import stream

    if not prompt and not prompt_ids:
        raise UserError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    conv = conventions_for(model.checkpoint, required=False)
    tokenizer = conv.tokenizer if conv is not None else None
    if tokenizer is None and prompt:
        raise UserError(f"{model.checkpoint} has no tokenizer.json; pass token ids with --prompt-ids instead")
    prompts: list = list(prompt)
    for s in prompt_ids:
        try:
            prompts.append([int(t) for t in s.replace(",", " ").split()])
        except ValueError:
            raise UserError(f"--prompt-ids {s!r}: expected integers separated by commas") from None
    params = sampling.params()
    m = model.load()
    try:
        s = stream(m, prompts, max_new_tokens=max_new_tokens, sampling=params, stop_strings=list(sampling.stop),
                   stop_tokens=conv.eos_ids if conv is not None and conv.eos_ids else None,
                   tokenizer=tokenizer, add_bos=bos, speculative=sampling.speculative, compile=model.compile)
    except ValueError as e:
        raise UserError(str(e)) from None
    single = len(prompts) == 1
    for delta in s:
        if single and tokenizer is not None:
            print(delta.text, end="", flush=True)
    if single and tokenizer is not None:
        print()
    else:
        for i, c in enumerate(s.completions):
            head = f"[{i}] " if not single else ""
            print(head + (c.text if c.text is not None and tokenizer is not None else " ".join(map(str, c.tokens))))
    if sampling.stats:
        _print_stats(s.stats)
    if report:
        write_decode_report(report, model, m, s.stats, speculative=sampling.speculative)
    return 0


def write_decode_report(path: str, args: ModelArgs, model, stats, speculative: bool) -> None:
    """``--report FILE``: one run's decode figures as JSON, with what predicting them needs (the
    checkpoint's config.json, the weights' format, the threads and the machine), for
    ``gasungbi plan backtest --decode FILE``."""
    import json
    import platform

    import torch

    from gasungbi.atomic import write_text
    from gasungbi.interop.quantized import quantization_config

    qcfg, weight = quantization_config(args.checkpoint), next(model.parameters())
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    weights = args.quant or (qcfg["mode"] if qcfg else names.get(weight.dtype, str(weight.dtype)))
    config = json.loads((Path(args.checkpoint) / "config.json").read_text(encoding="utf-8"))
    data = {"kind": "gasungbi decode", "checkpoint": str(Path(args.checkpoint).resolve()), "config": config,
            "weights": weights, "device": str(weight.device), "threads": torch.get_num_threads(),
            "compile": args.compile, "speculative": speculative, "batch_size": stats.batch_size,
            "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "prefill_s": stats.prefill_s,
            "compile_steps": stats.compile_steps, "compile_s": stats.compile_s, "decode_s": stats.decode_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
            "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine()}}
    try:
        write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"--report {path}: {e.strerror or e}") from None
    print(f"decode report written to {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

CHAT_HELP = "/reset clears the conversation, /quit (or Ctrl-D) leaves"


def chat_cmd(model: Annotated[ModelArgs, Flat], sampling: Annotated[SamplingArgs, Flat] = SamplingArgs(),
             system: str | None = None, max_new_tokens: int = 512, thinking: bool | None = None) -> int:
    """Multi-turn chat with a checkpoint, streaming: /reset clears the conversation, /quit (or Ctrl-D) leaves.

    Args:
        model: the checkpoint and where it runs
        sampling: sampling and stops
        system: a system message opening the conversation
        max_new_tokens: longest reply
        thinking: the chat template's thinking switch, where it has one (DeepSeek-V3.1's thinking,
            Qwen3's enable_thinking); default: the template's own
    """
    from gasungbi.infer.generate import ContextLengthError, stream

    conv = conventions_for(model.checkpoint, required=True)
    params = sampling.params()
    m = model.load()
    opening = [{"role": "system", "content": system}] if system else []
    switches = None if thinking is None else {"thinking": thinking, "enable_thinking": thinking}
    messages = list(opening)
    interactive = sys.stdin.isatty()
    print(f"chat with {model.checkpoint} ({CHAT_HELP})", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            messages = list(opening)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            # the checkpoint's template; the person typing writes every turn, so special tokens stay special
            ids = conv.chat_ids(messages, content_as_text=False, template_kwargs=switches)
            s = stream(m, [ids], max_new_tokens=max_new_tokens, sampling=params, stop_tokens=conv.stop_ids,
                       stop_strings=list(sampling.stop), tokenizer=conv.tokenizer, speculative=sampling.speculative,
                       compile=model.compile)
        except ContextLengthError as e:
            messages.pop()
            print(f"(the conversation no longer fits: {e}; /reset to start over)", file=sys.stderr)
            continue
        except ValueError as e:  # the template refused the conversation (raise_exception)
            messages.pop()
            print(f"({e})", file=sys.stderr)
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        for delta in s:
            print(delta.text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": s.completions[0].text})
        if sampling.stats:
            _print_stats(s.stats)
    return 0
