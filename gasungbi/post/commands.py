"""CLI: ``gasungbi sft``, ``gasungbi grpo``, ``gasungbi distill``.

Each command's flags are the fields of its config dataclass (``SFT`` reuses the training fields).
"""

from __future__ import annotations

from typing import Annotated

from tyro.conf import OmitArgPrefixes

from gasungbi.errors import UserError
from gasungbi.post.distill import DistillConfig
from gasungbi.post.grpo import GRPOConfig
from gasungbi.post.sft import SFT_DEFAULTS
from gasungbi.train.commands import Overrides, with_model_overrides
from gasungbi.train.trainer import TrainConfig


def sft(cfg: Annotated[TrainConfig, OmitArgPrefixes] = SFT_DEFAULTS, set: Overrides = (),
        config: str | None = None) -> int:
    """Chat SFT on OpenAI-format conversations (JSONL: one {"messages": [...]} per line); the loss is on
    the assistant tokens only. --init-from is the checkpoint to fine-tune (it brings the tokenizer).

    Args:
        cfg: the run (the training fields)
        set: override a model config field
        config: a JSON or TOML file of fields; flags given here override it
    """
    from gasungbi.post.sft import sft as run_sft

    try:
        report = run_sft(with_model_overrides(cfg, set))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"step {report['step']}: val loss {report['val_loss']:.4f} on assistant tokens; "
          f"checkpoint {report['checkpoint']}")
    return 0


def grpo_cmd(cfg: Annotated[GRPOConfig, OmitArgPrefixes]) -> int:
    """Reinforcement learning with verifiable rewards (GRPO / Dr. GRPO) on the reasoning gym.

    Args:
        cfg: the run; --init-from is required
    """
    from gasungbi.post.grpo import grpo

    try:
        r = grpo(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    b, a = r["before"], r["after"]
    print(f"held-out accuracy: {b['accuracy']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] -> "
          f"{a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] (n={a['n']}); checkpoint {r['checkpoint']}")
    return 0


def distill_cmd(cfg: Annotated[DistillConfig, OmitArgPrefixes]) -> int:
    """Sample reasoning traces from a teacher, keep the rewarded ones, SFT a student on them.

    Args:
        cfg: the run; --teacher and --student are required
    """
    from gasungbi.post.distill import distill

    try:
        r = distill(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"kept {r['kept']} of {r['sampled']} teacher traces ({r['acceptance']:.0%}); "
          f"student checkpoint {r['student']['checkpoint']}")
    return 0
