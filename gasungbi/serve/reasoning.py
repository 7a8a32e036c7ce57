"""Reasoning apart from the answer, as DeepSeek's API and vLLM's ``deepseek_r1`` parser give it.

A reasoning model writes its thoughts inside ``<think>...</think>``, then the answer. The chat
endpoint returns the thoughts as ``message.reasoning_content`` (streamed as
``delta.reasoning_content``) and the rest as ``message.content``. Where the reply starts depends on
the prompt: DeepSeek-R1's template opens ``<think>`` itself, so the reply begins inside the
thoughts; V3.1 with thinking off closes it (``</think>``) so the reply is all answer; Qwen3 and
gasungbi's reasoning traces let the model open ``<think>``. :func:`opens_thinking` reads that from
the rendered prompt, and :class:`ReasoningSplitter` splits the reply as it streams, holding back
only what could be the start of a tag.

Deviation from vLLM's parser: a reply that never closes its thoughts is all reasoning there as
here, but one whose prompt closed them (thinking off) is all content here, where vLLM needs
another parser for that.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def has_think_tags(conventions) -> bool:
    """Whether a checkpoint's chat template or vocabulary has the think tags (the parser's default)."""
    vocab = conventions.tokenizer.get_vocab()
    return END in vocab or (conventions.template is not None and END in conventions.template)


def opens_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the reply inside ``<think>`` (opened, not closed)."""
    return prompt_text.rfind(START) > prompt_text.rfind(END)


class ReasoningSplitter:
    """One reply's text, fed as it streams, split into (reasoning, content) deltas."""

    def __init__(self, inside: bool = False):
        self.state = "start" if not inside else "reasoning"
        self.fresh = inside  # a reply inside the thoughts may still repeat the opening <think>
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and content that ``text`` completes (possibly both, possibly neither)."""
        self.held += text
        reasoning = content = ""
        while self.held:
            if self.state == "start":  # does the reply open <think>?
                stripped = self.held.lstrip()
                if START.startswith(stripped):  # could still become <think>
                    break
                if stripped.startswith(START):
                    self.held, self.state = stripped[len(START):], "reasoning"
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if self.fresh:
                    stripped = self.held.lstrip()
                    if START.startswith(stripped):
                        break
                    self.fresh = False
                    if stripped.startswith(START):
                        self.held = stripped[len(START):]
                        continue
                i = self.held.find(END)
                if i >= 0:
                    reasoning += self.held[:i]
                    self.held, self.state = self.held[i + len(END):], "content"
                    continue
                keep = _partial_suffix(self.held, END)  # hold back what may start </think>
                reasoning += self.held[:len(self.held) - keep]
                self.held = self.held[len(self.held) - keep:]
                break
            else:
                content += self.held
                self.held = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is still held back when the reply ends."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "reasoning" else ("", held)


def split(text: str, inside: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole reply."""
    s = ReasoningSplitter(inside)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
