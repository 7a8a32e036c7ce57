"""Text generation: prefill the prompt, then decode one token per step against the latent cache.

The steps run on the decode engine (:mod:`gasungbi.infer.engine`, through
:func:`~gasungbi.infer.decode.decode_steps`): a preallocated cache written in place, one prefill
forward (naive MLA: decompressing K/V once is cheaper for many tokens), then one single-token step
per token with the absorbed MLA, which reads only the cached latent and rope key. Only the logits
of the last position go through the output head.

Batches of prompts of different lengths are left-padded to the longest: row b's real tokens start
at slot ``pad[b]``, the model gets per-row positions (slot - pad[b]) and a mask that hides the
padding slots, so every row decodes exactly as if it ran
alone, and all rows advance one slot per step. Rows that finish early keep decoding (their tokens
are dropped) until every row is done or ``max_new_tokens`` is reached.

Stops: a stop token (the config's ``eos_token_id`` by default; not part of the output) or a stop
string (searched in the decoded text, which is cut before it). The context limit is checked before
anything runs: prompt + ``max_new_tokens`` must fit ``max_position_embeddings``.

:func:`stream` is the streaming iterator (text deltas per row); :func:`generate` collects it.
With ``speculative=True`` one prompt is decoded with the model's own MTP module drafting a token
per step (:mod:`gasungbi.infer.speculative`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from gasungbi.data.conventions import encode
from gasungbi.infer.decode import ContextLengthError, GenerationStats, check_context, decode_steps  # noqa: F401
from gasungbi.infer.engine import model_device_dtype
from gasungbi.infer.sampling import GREEDY, SamplingParams
from gasungbi.infer.speculative import check_speculative, speculative_steps


@dataclass
class Completion:
    """One prompt's result. ``tokens`` excludes a stop token; ``text`` is cut before a stop string."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str
    """``"stop"`` (stop token or stop string) or ``"length"`` (max_new_tokens reached)."""


@dataclass
class Delta:
    """A streaming event: row ``index`` produced ``token`` and the text it makes final.

    ``text`` may be empty while bytes of a character or a possible stop string are held back.
    The last event of a row has ``finish_reason`` set.
    """

    index: int
    token: int
    text: str
    finish_reason: str | None = None


# ---------------------------------------------------------------------------------------------
# tokens -> text, stops
# ---------------------------------------------------------------------------------------------

class Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character (the offsets scheme of
    text-generation-inference): decode a short window of recent tokens and emit what it adds."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(prefix):]


class RowState:
    """One prompt's output: its tokens, text, stop checks and the text already streamed."""

    def __init__(self, index: int, prompt: list[int], max_new: int, stop_tokens: set[int],
                 stop_strings: Sequence[str], tokenizer):
        self.index, self.prompt, self.max_new = index, prompt, max_new
        self.stop_tokens, self.stop_strings = stop_tokens, list(stop_strings)
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.emitted = 0  # characters of self.text already streamed
        self.finish_reason: str | None = None

    def _held_back(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop_strings), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return n
        return 0

    def push(self, token: int) -> Delta:
        if token in self.stop_tokens:
            self.finish_reason = "stop"
            return Delta(self.index, token, self._flush(), "stop")
        self.tokens.append(token)
        if self.detok is not None:
            before = len(self.text)
            self.text += self.detok.add(token)
            if self.stop_strings:
                start = max(0, before - max(len(s) for s in self.stop_strings) + 1)
                hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.finish_reason = "stop"
                    return Delta(self.index, token, self._take(len(self.text)), "stop")
        if len(self.tokens) >= self.max_new:
            self.finish_reason = "length"
            return Delta(self.index, token, self._flush(), "length")
        return Delta(self.index, token, self._take(len(self.text) - self._held_back()))

    def _take(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out

    def _flush(self) -> str:
        if self.detok is not None:
            self.text += self.detok.flush()
        return self._take(len(self.text))

    def completion(self) -> Completion:
        return Completion(self.prompt, self.tokens, self.text if self.detok is not None else None,
                          self.finish_reason or "length")


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def encode_prompts(prompts, tokenizer=None, add_bos: bool = True) -> list[list[int]]:
    """A str, a list of ids, or a list of either -> a list of id lists.

    Text needs ``tokenizer``; it gets the special tokens the tokenizer's own rule puts around text
    (:func:`gasungbi.data.conventions.encode`: its post-processor, as transformers; ``<|bos|>`` for
    gasungbi's tokenizer), none with ``add_bos=False``. Id lists are used as given.
    """
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)) \
            or isinstance(prompts, torch.Tensor) and prompts.dim() == 1:
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (pass tokenizer= or token ids)")
            ids = encode(tokenizer, p, add_special_tokens=add_bos).ids
        else:
            ids = [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        out.append(ids)
    if not out:
        raise ValueError("no prompts given")
    return out


class Stream:
    """Iterating yields :class:`Delta` events; afterwards ``completions`` and ``stats`` are filled.

    Built by :func:`stream`. Breaking out of the loop stops generation (the remaining rows are
    reported with ``finish_reason="length"``).
    """

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
                 stop_tokens: set[int], stop_strings: Sequence[str], tokenizer, speculative: bool,
                 compile: bool = False, group=None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        V = model.config.vocab_size
        for p in prompts:
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"token ids {bad[:5]} out of range for vocab_size={V}")
        check_context(model.config, max(len(p) for p in prompts), max_new_tokens)
        self.model, self.prompts, self.max_new, self.sampling = model, prompts, max_new_tokens, sampling
        self.speculative, self.compile, self.group = speculative, compile, group
        self.device = model_device_dtype(model)[0]
        self.rows = [RowState(i, p, max_new_tokens, stop_tokens, stop_strings, tokenizer) for i, p in enumerate(prompts)]
        self.stats = GenerationStats()
        if speculative:
            check_speculative(model, len(prompts))

    @property
    def completions(self) -> list[Completion]:
        return [r.completion() for r in self.rows]

    def __iter__(self) -> Iterator[Delta]:
        if self.speculative:
            steps = speculative_steps(self.model, self.prompts[0], self.max_new, self.sampling, self.stats)
        else:
            steps = decode_steps(self.model, self.prompts, self.max_new, self.sampling, self.stats, self.compile)
        try:
            for tokens in steps:
                for row, tok in zip(self.rows, tokens):
                    if row.finish_reason is None:
                        yield row.push(tok)
                if all_done(all(r.finish_reason is not None for r in self.rows), self.group, self.device):
                    break
        finally:
            steps.close()


def all_done(done: bool, group=None, device=None) -> bool:
    """Whether every rank of ``group`` is done (``done`` here when there is no group): ranks whose
    forwards exchange tokens (expert parallelism) must all take the same number of steps.
    ``device``: where the flag is reduced (the model's: NCCL reduces CUDA tensors only)."""
    if group is None:
        return done
    import torch.distributed as dist

    flag = torch.tensor([int(done)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def stream(model, prompts, *, max_new_tokens: int = 128, sampling: SamplingParams = GREEDY,
           stop_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (), tokenizer=None,
           add_bos: bool = True, speculative: bool = False, compile: bool = False, group=None) -> Stream:
    """Stream the generation for ``prompts`` (text with ``tokenizer``, or token ids; one or a batch).

    ``stop_tokens``: default the config's ``eos_token_id``; ``()`` for none. ``speculative``: draft
    with the model's MTP module (one prompt at a time; greedy output unchanged). ``compile``: run
    the engine's decode step compiled (torch.compile; pays off over long or repeated generations).
    ``group``: the process group of an expert-parallel model (torch.distributed); its ranks generate
    together, each its own prompts, until all of them are done.
    """
    cfg = model.config
    ids = encode_prompts(prompts, tokenizer, add_bos)
    if stop_tokens is None:
        stop_tokens = [cfg.eos_token_id] if cfg.eos_token_id is not None else []
    return Stream(model, ids, max_new_tokens, sampling, set(stop_tokens), stop_strings, tokenizer, speculative,
                  compile, group)


def generate(model, prompts, *, max_new_tokens: int = 128, sampling: SamplingParams = GREEDY,
             stop_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (), tokenizer=None,
             add_bos: bool = True, speculative: bool = False, compile: bool = False, group=None) -> list[Completion]:
    """Generate for every prompt; returns one :class:`Completion` per prompt (see :func:`stream`)."""
    s = stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
               stop_strings=stop_strings, tokenizer=tokenizer, add_bos=add_bos, speculative=speculative,
               compile=compile, group=group)
    for _ in s:
        pass
    return s.completions
