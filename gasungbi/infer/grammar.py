"""Constrained decoding: a reply that must follow a grammar (JSON, a JSON schema), by masking the
tokens that would break it before each one is sampled.

The grammar engine is llguidance (Microsoft's, on PyPI; llama.cpp and vLLM use it too): a Rust
parser with no Python dependencies that computes the mask of allowed next tokens over a whole
vocabulary in tens of microseconds, lexing lazily so that a JSON schema needs no up-front
compilation over the vocabulary (xgrammar, the other maintained engine, needs torch and transformers
as dependencies and compiles per vocabulary). A request's :class:`Constraint` is asked for its mask
before each of its tokens and told the token after; only constrained rows pay for it.

JSON whitespace is strict (no run of blanks between tokens), so a model cannot spend its tokens on
whitespace inside the object.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import torch


class GrammarError(ValueError):
    """A grammar or JSON schema the engine refuses; the message says why."""


class Constraint:
    """One reply's grammar state: :meth:`mask` of the tokens allowed next, :meth:`accept` the one taken."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Allowed next tokens, bool [vocab_size] (the stop tokens once the grammar is complete)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        return torch.from_numpy(allowed).to(device)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar does not allow it (the reply then ends)."""
        return bool(self.matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """Whether the reply so far is a whole sentence of the grammar."""
        return bool(self.matcher.is_accepting())


class Grammars:
    """The grammars of one tokenizer: built once (the engine's view of the vocabulary), then one
    :class:`Constraint` per reply. ``stop_ids``: the tokens that end a reply, allowed once complete."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Iterable[int]):
        import llguidance

        self._llg = llguidance
        stops = [t for t in stop_ids if t is not None and t < vocab_size]
        if not stops:
            raise GrammarError("constrained decoding needs a stop token: the tokenizer has none")
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=stops)

    def _constraint(self, grammar: str) -> Constraint:
        m = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Constraint(m, self.vocab_size)

    def json_schema(self, schema: dict) -> Constraint:
        """Replies that are JSON documents valid under ``schema``."""
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                  defaults={"whitespace_flexible": False})
        except (TypeError, ValueError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return self._constraint(grammar)

    def lark(self, grammar: str) -> Constraint:
        """Replies in the language of a Lark grammar (llguidance's dialect: ``%json {schema}`` for a
        JSON value, ``<[id]>`` for a special token)."""
        try:
            return self._constraint(self._llg.LLMatcher.grammar_from_lark(grammar))
        except (TypeError, ValueError) as e:
            raise GrammarError(f"invalid grammar: {e}") from None

    def json_object(self) -> Constraint:
        """Replies that are a JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return self.json_schema({"type": "object"})
