"""CLI: ``gasungbi eval`` (lm-evaluation-harness tasks on gasungbi's engine); heavy imports stay inside.

The gym accuracy (``gasungbi eval-gym``, alias ``eval-tasks``) is ``gasungbi.post.commands:eval_tasks_cmd``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from tyro.conf import OmitArgPrefixes, UseAppendAction

from gasungbi.errors import UserError
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
