"""CLI: ``gasungbi eval`` (lm-evaluation-harness tasks on gasungbi's engine), ``gasungbi eval-gym``
(held-out accuracy on the reasoning gym) and ``gasungbi quantize`` (here rather than in
``infer/commands.py`` because it reports the perplexity change, and infer does not import eval);
heavy imports stay inside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import OmitArgPrefixes, UseAppendAction

from gasungbi.errors import UserError, require_checkpoint_dir
from gasungbi.flags import Checkpoint
from gasungbi.infer.commands import ModelArgs, tokenizer_for

INSTALL_HINT = "pip install 'gasungbi[eval]'"


def _offline_miss(e: BaseException) -> bool:
    """Whether ``e`` is the datasets/hub library failing to fetch something (offline, not cached)."""
    if isinstance(e, ConnectionError):
        return True
    module = type(e).__module__ or ""
    return module.startswith(("datasets", "huggingface_hub", "requests", "urllib3"))


def eval_cmd(model: Annotated[ModelArgs, OmitArgPrefixes], tasks: str,
             include_path: Annotated[tuple[str, ...], UseAppendAction] = (), num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 8, output: str | None = None) -> int:
    """lm-evaluation-harness tasks (loglikelihood, perplexity, generation) on gasungbi's inference engine;
    prints lm-eval's table. Needs the eval extra: pip install 'gasungbi[eval]'.

    Nothing is downloaded at run time (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1): a hub task such as
    hellaswag works when its data set is already in the local Hugging Face cache; local tasks (YAML +
    JSON/JSONL) come with --include-path. Scores equal lm-eval's hf backend on the same checkpoint.

    Args:
        model: the checkpoint and where it runs (--quant, --device and --experts-device apply)
        tasks: comma-separated lm-eval task, group or tag names (or YAML files), e.g. hellaswag,arc_easy
        include_path: a folder of task YAML files to add to lm-eval's own
        num_fewshot: examples in each prompt (default: the task's)
        limit: evaluate only the first N documents of each task
        batch_size: requests per forward (scoring) or per generation batch
        output: write lm-eval's results JSON here
    """
    require_checkpoint_dir(model.checkpoint)  # a wrong path first: it is named, not a task
    # before datasets / huggingface_hub are imported: they read these once
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table

        from gasungbi.eval.harness import GasungbiLM, special_tokens
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("lm_eval", "datasets", "evaluate"):
            raise UserError(f"gasungbi eval needs lm-eval ({e.name} is missing): {INSTALL_HINT}") from None
        raise
    import json

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: give at least one task name")
    for d in include_path:
        if not Path(d).is_dir():
            raise UserError(f"--include-path {d}: no such folder")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    manager = TaskManager(include_path=list(include_path) or None)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        import difflib
        hints = [f"{n} (did you mean {', '.join(m)}?)" if (m := difflib.get_close_matches(n, manager.all_tasks, 3))
                 else n for n in unknown]
        raise UserError(f"--tasks: unknown task(s) {'; '.join(hints)} (lm_eval ls tasks lists them; "
                        f"--include-path adds a folder of YAML tasks)")
    tokenizer = tokenizer_for(model.checkpoint, required=True)
    lm = GasungbiLM(model.load(), tokenizer, special_tokens(model.checkpoint), batch_size=batch_size,
                    name=model.checkpoint)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          batch_size=batch_size, task_manager=manager, log_samples=False)
    except Exception as e:  # noqa: BLE001 - a data set the cache does not hold
        if _offline_miss(e):
            raise UserError(f"a task's data set is not in the local Hugging Face cache and gasungbi eval never "
                            f"downloads ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"fetch it once, e.g. datasets.load_dataset(PATH, NAME) online") from None
        raise
    if results is None:  # not rank 0
        return 0
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
                                + "\n", encoding="utf-8")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------

def quantize_cmd(checkpoint: Checkpoint, mode: Literal["int8", "int4", "fp8"], out: str, group_size: int = 128,
                 eval_text: str | None = None, eval_tokens: int = 32768, seq_len: int = 256,
                 overwrite: bool = False) -> int:
    """Weight-only int8/int4 quantization of a checkpoint, saved for generate, chat and serve, or
    DeepSeek's FP8 checkpoint format (fp8). int8/int4 read and quantize one tensor at a time: the
    float model is never in memory (only --eval-text loads it, to compare).

    Args:
        checkpoint: a floating-point checkpoint directory
        mode: int8 (per-channel), int4 (grouped) or fp8 (DeepSeek-V3's E4M3 with 128x128 block scales)
        out: output directory
        group_size: int4 group size
        eval_text: a text file: report the perplexity change on it
        eval_tokens: tokens of --eval-text to use
        seq_len: window of the perplexity evaluation
        overwrite: replace what --out already holds (never the checkpoint itself)
    """
    import torch

    from gasungbi import atomic
    from gasungbi.eval.perplexity import perplexity
    from gasungbi.infer.load import load_quantized, read_quantizing
    from gasungbi.infer.quant import check_group_size
    from gasungbi.interop.fp8 import fp8_config
    from gasungbi.interop.hf import load_model
    from gasungbi.interop.quantized import quantization_config, save_quantized
    from gasungbi.model.transformer import build_model
    from gasungbi.outputs import output_dir

    require_checkpoint_dir(checkpoint)
    # the whole of --out is replaced once written: it must not be (or hold) the checkpoint it is made from
    out_dir = output_dir(out, "--out", inputs=[checkpoint], overwrite=overwrite).resolve()
    if mode == "int4":
        try:
            check_group_size(group_size)
        except ValueError as e:
            raise UserError(str(e)) from None
    if eval_text is not None and not Path(eval_text).is_file():
        raise UserError(f"--eval-text {eval_text}: no such file")
    if quantization_config(checkpoint) is not None:
        raise UserError(f"{checkpoint} is already quantized")
    source_fp8 = fp8_config(checkpoint) is not None
    if source_fp8 and mode == "fp8":
        raise UserError(f"{checkpoint} is already in DeepSeek's FP8 format")
    # an FP8 source is dequantized to bf16 one tensor at a time, never to a whole float32 model
    float_dtype = torch.bfloat16 if source_fp8 else torch.float32
    has_tok = (Path(checkpoint) / "tokenizer.json").exists()
    tokenizer = checkpoint if has_tok else None
    model = None
    if mode == "fp8":
        from gasungbi.interop.hf import save_model

        model = load_model(checkpoint, "cpu", float_dtype)
        atomic.write_dir(out_dir, lambda tmp: save_model(model, tmp, tokenizer=tokenizer, fp8=True))
        qmodel = load_model(out_dir, "cpu", torch.float32)
        stored = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
        print(f"fp8: {_weight_bytes(model) / 2**20:.1f} MiB in float32 -> {stored / 2**20:.1f} MiB on disk; wrote {out}")
    else:  # one tensor at a time from the float files (read_quantizing): the float model is never in memory
        cfg, qsd = read_quantizing(checkpoint, mode, group_size, float_dtype)
        atomic.write_dir(out_dir, lambda tmp: save_quantized(qsd, cfg, tmp, mode, group_size, tokenizer=tokenizer))
        del qsd
        qmodel = load_quantized(out_dir)
        meta = build_model(cfg, device="meta")
        float_bytes = sum(t.numel() for t in [*meta.parameters(), *meta.buffers()]) * float_dtype.itemsize
        print(f"{mode}: {float_bytes / 2**20:.1f} MiB -> {_weight_bytes(qmodel) / 2**20:.1f} MiB "
              f"in memory; wrote {out}")
    if eval_text:
        tok = tokenizer_for(checkpoint, required=True)
        ids = tok.encode(Path(eval_text).read_text(encoding="utf-8")).ids[: eval_tokens + 1]
        ids = torch.tensor(ids)
        model = model or load_model(checkpoint, "cpu", float_dtype)
        seq = min(seq_len, model.config.max_position_embeddings, ids.numel() - 1)
        try:
            base, new = perplexity(model, ids, seq), perplexity(qmodel, ids, seq)
        except ValueError as e:
            raise UserError(f"--eval-text: {e}") from None
        print(f"perplexity on {ids.numel() - 1:,} tokens of {eval_text}: float32 {base:.3f}, "
              f"{mode} {new:.3f} ({(new / base - 1) * 100:+.2f}%)")
    return 0


def _weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (quantized weights at their stored size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and not t.is_meta:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def eval_gym_cmd(checkpoint: Checkpoint, task: str = "arithmetic", difficulty: int = 2, n: int = 200,
                   k: int = 1, reasoning: bool = True, max_new_tokens: int = 64, seed: int = 0,
                   json: bool = False) -> int:
    """Held-out accuracy on the reasoning gym: pass@1 (greedy) with a 95% interval, and pass@k.

    Args:
        checkpoint: a checkpoint directory
        task: gym task family (arithmetic, addition, countdown, sort)
        difficulty: task difficulty
        n: held-out tasks
        k: pass@k (samples k per task at temperature 1)
        reasoning: ask for <think>...</think><answer>...</answer>
        max_new_tokens: longest completion
        seed: seed of the task draw and the sampler
        json: print JSON
    """
    import json as json_module

    from gasungbi.eval.accuracy import evaluate_checkpoint

    require_checkpoint_dir(checkpoint)
    for flag, value in (("--n", n), ("--k", k), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    try:
        r = evaluate_checkpoint(checkpoint, task, difficulty, n=n, k=k, reasoning=reasoning,
                                max_new_tokens=max_new_tokens, seed=seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    if json:
        print(json_module.dumps(r, indent=2))
    else:
        lo, hi = r["ci95"]
        print(f"{task} (difficulty {difficulty}), {r['n_tasks']} held-out tasks: pass@1 {r['pass@1']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]" + (f", pass@{k} {r[f'pass@{k}']:.3f}" if k > 1 else ""))
    return 0
