"""The chat template: how a conversation becomes one token sequence. Post-training uses the same.

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|><|user|>...

Every message is its role marker, the content, and ``<|end|>``; the sequence opens with
``<|bos|>`` as every pretraining document does. To ask for a reply, the rendering ends with an open
``<|assistant|>``; the model ends its reply with ``<|end|>`` (the stop token of a chat). No
whitespace is added around the markers: the tokenizer's special tokens split the text there.
Reasoning traces, when a model produces them, stay inside the assistant content as
``<think>...</think><answer>...</answer>``.
"""

from __future__ import annotations

from typing import Iterable, Mapping

ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
BOS, END = "<|bos|>", "<|end|>"


def render_chat(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True, bos: bool = True) -> str:
    """Render ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` as one string.

    ``add_generation_prompt``: end with an open ``<|assistant|>`` turn for the model to complete.
    """
    parts = [BOS] if bos else []
    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        parts.append(f"{ROLES[role]}{m['content']}{END}")
    if add_generation_prompt:
        parts.append(ROLES["assistant"])
    return "".join(parts)


def encode_chat(tokenizer, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of :func:`render_chat` (special tokens become their ids)."""
    return tokenizer.encode(render_chat(messages, add_generation_prompt)).ids


# The same template in Jinja, written into tokenizer_config.json so that transformers'
# ``apply_chat_template`` renders exactly what :func:`render_chat` does (tests/test_sft.py).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
