"""lm-evaluation-harness on gasungbi's engine: an in-process ``lm_eval`` model (``gasungbi eval``).

:class:`GasungbiLM` answers lm-eval's three request types with a loaded gasungbi model
(:func:`gasungbi.infer.load.load_for_inference`, so quantization and expert placement apply):

- ``loglikelihood(context, continuation)``: one forward over context + continuation (minus its last
  token), right-padded into batches; the log-softmax is taken in float32 at the continuation
  positions only and summed, and ``is_greedy`` says whether every continuation token is the argmax.
  Requests that share their input (the choices of a multiple-choice question whose answers are one
  token) share the forward.
- ``loglikelihood_rolling(text)``: the text split into lm-eval's disjoint windows of the model's
  context (``lm_eval.utils.get_rolling_token_windows``; the first is conditioned on the prefix token),
  each scored as above, summed.
- ``generate_until(context, until, max_gen_toks)``: :func:`gasungbi.infer.generate.generate` over
  left-padded batches, greedy unless the task asks for sampling, stopped at the eos token or a stop
  string; the text is cut at the first stop string.

Tokenization mirrors lm-eval's ``hf`` backend (``lm_eval/models/huggingface.py``, 0.4.x), so that the
scores equal ``lm_eval --model hf`` on the same checkpoint: text is encoded by tokenizer.json with
the special tokens its post-processor adds (transformers' rule; none when the text already starts
with the prefix token's text), a context and its continuation are encoded jointly and split
(``TemplateLM._encode_pair``), the prefix token for empty contexts and rolling windows is the
tokenizer's bos (else eos) token from tokenizer_config.json, the context limit is the config's
``max_position_embeddings`` (longer inputs lose their oldest tokens), generations are decoded
without special tokens. gasungbi's own tokenizer has no post-processor, so its contexts get no
``<|bos|>`` here, as under the hf backend (rolling perplexity is conditioned on it all the same).

This module imports ``lm_eval`` (the ``eval`` extra); ``gasungbi eval`` imports it only when run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tokenizers import Tokenizer
from tqdm import tqdm

from gasungbi.infer.engine import model_device_dtype
from gasungbi.infer.generate import generate
from gasungbi.infer.sampling import GREEDY, SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for a task that does not say


def special_tokens(path: str | Path) -> dict[str, str]:
    """The named special tokens (bos_token, eos_token...) as transformers reads them: from
    tokenizer_config.json, else special_tokens_map.json (a string or an AddedToken dict each)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        f = Path(path) / name
        if f.is_file():
            for key, value in json.loads(f.read_text(encoding="utf-8")).items():
                value = value.get("content") if isinstance(value, dict) else value
                if key.endswith("_token") and isinstance(value, str):
                    out[key] = value
    return out


class GasungbiLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` over a gasungbi model and its checkpoint's tokenizer.

    ``model``: a loaded gasungbi Transformer (eval mode); ``tokenizer``: the checkpoint's
    tokenizer.json; ``specials``: its named special tokens (:func:`special_tokens`).
    """

    def __init__(self, model, tokenizer: Tokenizer, specials: dict[str, str] | None = None,
                 batch_size: int = 8, name: str = "gasungbi"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tok, self.batch_size, self.name = model, tokenizer, batch_size, name
        cfg = model.config
        specials = specials or {}
        bos, eos = specials.get("bos_token"), specials.get("eos_token")
        self.bos_id = tokenizer.token_to_id(bos) if bos else None
        self.eos_id = tokenizer.token_to_id(eos) if eos else cfg.eos_token_id
        if self.eos_id is None and self.bos_id is None:
            raise ValueError("the checkpoint names neither a bos nor an eos token (tokenizer_config.json or "
                             "config.json): lm-eval needs one to condition empty contexts on")
        self.max_length = cfg.max_position_embeddings
        self._device = model_device_dtype(model)[0]  # LM.device reads it
        self.stop_ids = sorted({t for t in (cfg.eos_token_id, self.eos_id) if t is not None})

    # --- lm-eval's tokenization interface ----------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos_id if self.eos_id is not None else self.bos_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's rule, unless the text already opens with the prefix
            add_special_tokens = not string.startswith(self.tok_decode([self.prefix_token_id], False))
        return self.tok.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {"model_name": self.name, "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(model_device_dtype(self.model)[1])}

    # --- scoring -----------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log-probs, all greedy)."""
        inputs: dict[tuple[int, ...], list[int]] = defaultdict(list)  # input ids -> the requests scored on it
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("loglikelihood needs a non-empty context and continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                 f"{self.max_length} tokens")
            whole = (ctx + cont)[-(self.max_length + 1):]  # too long: cut the context on the left
            inputs[tuple(whole[:-1])].append(i)
        order = sorted(inputs, key=len, reverse=True)  # longest first: less padding per batch
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            T = len(batch[0])
            ids = torch.zeros(len(batch), T, dtype=torch.long)  # right-padded: causal attention never sees the pad
            for b, inp in enumerate(batch):
                ids[b, :len(inp)] = torch.tensor(inp)
            h = self.model.hidden_states(ids.to(self.device))  # (B, T, d)
            for b, inp in enumerate(batch):
                reqs = inputs[inp]
                n = max(len(requests[i][2]) for i in reqs)  # positions scored: the longest continuation's
                logp = self.model.lm_head(h[b, len(inp) - n:len(inp)]).float().log_softmax(-1)  # (n, V)
                greedy = logp.argmax(-1)
                for i in reqs:
                    cont = torch.tensor(requests[i][2][-n:], device=logp.device)
                    rows = logp[n - len(cont):]
                    score = rows.gather(1, cont[:, None]).sum().item()
                    out[i] = (score, bool((greedy[n - len(cont):] == cont).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                bar.update(len(reqs))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[r] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)  # same generation settings -> one batch stream
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id], False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for idx in groups.values():
            until, max_gen, sampling = _generation_settings(requests[idx[0]].args[1], eos)
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in the model's "
                                 f"{self.max_length} positions")
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] or [self.prefix_token_id]
                       for i in idx}
            idx = sorted(idx, key=lambda i: len(prompts[i]), reverse=True)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                done = generate(self.model, [prompts[i] for i in batch], max_new_tokens=max_gen, sampling=sampling,
                                stop_tokens=self.stop_ids, stop_strings=[s for s in until if s],
                                tokenizer=self.tok)
                for i, c in zip(batch, done):
                    text = self.tok_decode(c.tokens)
                    for s in until:
                        if s:
                            text = text.split(s)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out


def _generation_settings(kwargs: dict, eos: str) -> tuple[list[str], int, SamplingParams]:
    """A task's generation_kwargs -> (stop strings with the eos text, max new tokens, sampling), read
    as lm-eval reads them (``until`` a string or a list; max_gen_toks or its aliases; greedy unless
    ``do_sample`` with a temperature)."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if eos and eos not in until:
        until.append(eos)
    max_gen = next((int(kwargs[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens",
                                             "max_completion_tokens") if kwargs.get(k) is not None),
                   DEFAULT_MAX_GEN_TOKS)
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature == 0.0:
        return until, max_gen, GREEDY
    return until, max_gen, SamplingParams(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                                          top_p=float(kwargs.get("top_p") or 1.0), seed=kwargs.get("seed"))
