"""Chat SFT (DeepSeek-R1 Sec. 2.3.1's cold start, and any chat fine-tuning): the training loop of
:mod:`gasungbi.train.trainer` on OpenAI-format conversations, with the loss on the assistant tokens
only.

Conversations (JSONL, one ``{"messages": [...]}`` per line) are rendered with the checkpoint's own
chat template (:mod:`gasungbi.data.conventions`) and packed into rows by
:class:`gasungbi.data.sft.SFTLoader`; the checkpoint to fine-tune (``init_from``) brings the
tokenizer, which its checkpoints carry on.
"""

from __future__ import annotations

from typing import Any

from gasungbi.data.conventions import Conventions
from gasungbi.data.sft import SFTLoader, read_conversations
from gasungbi.eval.perplexity import evaluate_batches
from gasungbi.train import distributed as dist
from gasungbi.train.trainer import TrainConfig, train

SFT_DEFAULTS = TrainConfig(out_dir="runs/sft", max_steps=200, lr=1e-3, warmup_steps=10, eval_interval=50,
                           ckpt_interval=100, seq_len=512, batch_size=8)
"""The ``gasungbi sft`` command's defaults: a short run at a lower learning rate than pretraining."""


class SFTData:
    """SFT's data for the trainer: packed chat rows for training, the held-out conversations'
    assistant-token loss for validation."""

    def __init__(self, tc: TrainConfig, rank: int, world: int):
        if not tc.init_from:
            raise ValueError("invalid training config: sft needs init_from, the checkpoint to fine-tune "
                             "(it also provides the tokenizer)")
        self.tc, self.rank, self.world = tc, rank, world
        conv = Conventions.load(tc.init_from)  # the checkpoint's own chat template
        convs = read_conversations(tc.data)
        self.vocab_size = conv.tokenizer.get_vocab_size()
        self.tokenizer_dir = tc.init_from
        self.train = SFTLoader(tc.data, conv, "train", tc.batch_size // world, tc.seq_len, seed=tc.seed,
                               rank=rank, world_size=world, conversations=convs)
        self.val = SFTLoader(tc.data, conv, "val", max(1, tc.batch_size // world), tc.seq_len, seed=tc.seed,
                             rank=rank, world_size=world, conversations=convs)

    def evaluate(self, objective, amp, alone: bool = False) -> dict:
        """Validation on every rank's share, or (``alone``) all of it by this process."""
        rank, world, reduce = (0, 1, None) if alone else (self.rank, self.world, dist.all_reduce_sum)
        saved = self.val.rank, self.val.world_size
        self.val.rank, self.val.world_size = rank, world
        batches = list(self.val.eval_batches(self.tc.eval_batches))
        self.val.rank, self.val.world_size = saved
        return evaluate_batches(objective, batches, amp, all_reduce_sum=reduce)


def sft(tc: TrainConfig, started: float | None = None) -> dict[str, Any]:
    """Run (or resume) chat SFT of ``tc.init_from`` on the conversations in ``tc.data``; the report."""
    return train(tc, started, data=SFTData)
