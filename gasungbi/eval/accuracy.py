"""Held-out task accuracy of a model on the reasoning gym: pass@1 (greedy, so fixed) and pass@k
(k samples at temperature 1 per task, the unbiased estimator of Chen et al. 2021)."""

from __future__ import annotations

from gasungbi.data.conventions import Conventions
from gasungbi.eval.tasks import evaluate_tasks
from gasungbi.infer.generate import generate
from gasungbi.infer.sampling import SamplingParams
from gasungbi.gym.rewards import accuracy_reward
from gasungbi.gym.tasks import make_split


def evaluate_model(model, conv: Conventions, task: str = "arithmetic", difficulty: int = 2, n: int = 200, k: int = 1,
                   reasoning: bool = True, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64) -> dict:
    """Accuracy on ``n`` test-split tasks; pass@1 is greedy, pass@k samples ``k`` per task.
    ``conv``: the checkpoint's tokenizer, chat template and stops."""
    tasks = make_split(task, n, difficulty, seed=seed, split="test")

    def generate_fn(prompts: list[str], n_samples: int, s: int) -> list[list[str]]:
        sampling = SamplingParams() if n_samples == 1 else SamplingParams(temperature=1.0, seed=s)
        # prompts are the user-message contents of render_task_prompt
        ids = [conv.chat_ids([{"role": "user", "content": p}], content_as_text=False)
               for p in prompts for _ in range(n_samples)]
        texts: list[str] = []
        for i in range(0, len(ids), batch_size):
            outs = generate(model, ids[i:i + batch_size], max_new_tokens=max_new_tokens, tokenizer=conv.tokenizer,
                            stop_tokens=conv.stop_ids, sampling=sampling)
            texts += [o.text or "" for o in outs]
        return [texts[j * n_samples:(j + 1) * n_samples] for j in range(len(prompts))]

    was_training = model.training
    model.eval()
    result = evaluate_tasks(generate_fn, tasks, k=k, reward=accuracy_reward, reasoning=reasoning, seed=seed)
    model.train(was_training)
    return result


def evaluate_checkpoint(path: str, task: str = "arithmetic", difficulty: int = 2, n: int = 200, k: int = 1,
                        reasoning: bool = True, max_new_tokens: int = 64, seed: int = 0, device: str = "cpu") -> dict:
    from gasungbi.interop.hf import load_model
    return evaluate_model(load_model(path, device=device), Conventions.load(path), task, difficulty, n, k, reasoning,
                          max_new_tokens, seed)
