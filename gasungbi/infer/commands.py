"""Subcommands ``generate``, ``chat`` and ``quantize`` (registered with ``gasungbi.cli.command``).

Heavy imports stay inside the functions so that ``gasungbi --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gasungbi.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint, device, dtype, quantization and placement flags (generate, chat, serve)."""
    p.add_argument("checkpoint", help="a Hugging Face-layout checkpoint directory (gasungbi or transformers, "
                                      "or one written by gasungbi quantize)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights/activations dtype (default: bfloat16 on CUDA, the checkpoint's on CPU)")
    p.add_argument("--quant", choices=("int8", "int4"), default=None,
                   help="quantize the weights on load (weight-only; see gasungbi quantize to save them)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--experts-device", default=None,
                   help="keep routed experts here (e.g. cpu: system RAM) and the rest on --device")


def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed the sampler (reproducible runs)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="a stop string (repeatable)")
    p.add_argument("--speculative", action="store_true",
                   help="draft with the model's MTP module (self-speculative decoding; greedy output unchanged)")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and the draft acceptance rate) to stderr")


def _sampling(args):
    from gasungbi.infer.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_for_args(args):
    """The model the flags of :func:`add_model_args` describe (memory per device reported first);
    a bad checkpoint or device is a :class:`UserError`. Shared with ``gasungbi serve``."""
    import torch

    from gasungbi.infer.load import load_for_inference

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.device != "auto" and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device on this machine")
    try:
        return load_for_inference(args.checkpoint, args.device, dtype, args.quant, args.group_size,
                                  args.experts_device, report=lambda s: print(s, file=sys.stderr))
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None


def tokenizer_for(path: str, required: bool):
    """The checkpoint's tokenizer; without tokenizer.json, None or (``required``) a UserError."""
    from gasungbi.data.tokenizer import load_tokenizer

    if (Path(path) / "tokenizer.json").exists():
        return load_tokenizer(path)
    if required:
        raise UserError(f"{path} has no tokenizer.json; pass token ids with --prompt-ids instead")
    return None


def _print_stats(stats) -> None:
    line = (f"[{stats.new_tokens} tokens: prefill {stats.prefill_s * 1e3:.0f} ms, decode "
            f"{stats.decode_tokens_per_s:.1f} tokens/s")
    if stats.drafted:
        line += f", draft acceptance {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.drafted})"
    print(line + "]", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def _generate(args: argparse.Namespace) -> int:
    from gasungbi.infer.generate import stream

    if not args.prompt and not args.prompt_ids:
        raise UserError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    tokenizer = tokenizer_for(args.checkpoint, required=bool(args.prompt))
    prompts: list = list(args.prompt)
    for s in args.prompt_ids:
        try:
            prompts.append([int(t) for t in s.replace(",", " ").split()])
        except ValueError:
            raise UserError(f"--prompt-ids {s!r}: expected integers separated by commas") from None
    sampling = _sampling(args)
    model = load_for_args(args)
    try:
        s = stream(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   stop_strings=args.stop, tokenizer=tokenizer, add_bos=not args.no_bos,
                   speculative=args.speculative)
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
    if args.stats:
        _print_stats(s.stats)
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as token ids, e.g. 0,17,42 (for checkpoints without a tokenizer)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <|bos|> to text prompts")
    _sampling_args(p, max_new=128)


_generate.add_args = _generate_args


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

CHAT_HELP = "/reset clears the conversation, /quit (or Ctrl-D) leaves"


def _chat(args: argparse.Namespace) -> int:
    from gasungbi.data.chat import END, encode_chat
    from gasungbi.infer.generate import ContextLengthError, stream

    tokenizer = tokenizer_for(args.checkpoint, required=True)
    end_id = tokenizer.token_to_id(END)
    sampling = _sampling(args)
    model = load_for_args(args)
    stops = [t for t in (end_id, model.config.eos_token_id) if t is not None]
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    print(f"chat with {args.checkpoint} ({CHAT_HELP})", file=sys.stderr)
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
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids = encode_chat(tokenizer, messages)
        try:
            s = stream(model, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stops,
                       stop_strings=args.stop, tokenizer=tokenizer, speculative=args.speculative)
        except ContextLengthError as e:
            messages.pop()
            print(f"(the conversation no longer fits: {e}; /reset to start over)", file=sys.stderr)
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        for delta in s:
            print(delta.text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": s.completions[0].text})
        if args.stats:
            _print_stats(s.stats)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    _sampling_args(p, max_new=512)


_chat.add_args = _chat_args


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------

def _quantize(args: argparse.Namespace) -> int:
    import torch

    from gasungbi.infer import quant as q
    from gasungbi.interop.hf import load_model

    if q.quantization_config(args.checkpoint) is not None:
        raise UserError(f"{args.checkpoint} is already quantized")
    model = load_model(args.checkpoint, "cpu", torch.float32)
    qsd = q.quantize_state_dict(model, args.mode, args.group_size)
    has_tok = (Path(args.checkpoint) / "tokenizer.json").exists()
    out = q.save_quantized(qsd, model.config, args.out, args.mode, args.group_size,
                           tokenizer=args.checkpoint if has_tok else None)
    qmodel = q.load_quantized(out)
    print(f"{args.mode}: {q.weight_bytes(model) / 2**20:.1f} MiB -> {q.weight_bytes(qmodel) / 2**20:.1f} MiB "
          f"in memory; wrote {out}")
    if args.eval_text:
        tok = tokenizer_for(args.checkpoint, required=True)
        ids = tok.encode(Path(args.eval_text).read_text(encoding="utf-8")).ids[: args.eval_tokens + 1]
        ids = torch.tensor(ids)
        seq = min(args.seq_len, model.config.max_position_embeddings, ids.numel() - 1)
        try:
            base, new = q.perplexity(model, ids, seq), q.perplexity(qmodel, ids, seq)
        except ValueError as e:
            raise UserError(f"--eval-text: {e}") from None
        print(f"perplexity on {ids.numel() - 1:,} tokens of {args.eval_text}: float32 {base:.3f}, "
              f"{args.mode} {new:.3f} ({(new / base - 1) * 100:+.2f}%)")
    return 0


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a floating-point checkpoint directory")
    p.add_argument("--mode", choices=("int8", "int4"), required=True)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--eval-text", default=None, help="a text file: report the perplexity change on it")
    p.add_argument("--eval-tokens", type=int, default=32768, help="tokens of --eval-text to use")
    p.add_argument("--seq-len", type=int, default=256)


_quantize.add_args = _quantize_args
