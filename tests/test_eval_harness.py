"""``gasungbi eval``: lm-evaluation-harness tasks on gasungbi's engine, against lm-eval's own backends.

A tiny DeepseekV3 built by transformers (random weights, gasungbi's byte-level BPE tokenizer) is
evaluated on the three local tasks in tests/data/lm_eval_tasks (multiple choice by loglikelihood,
rolling perplexity, greedy generation until a stop string) three ways:

- gasungbi's in-process LM (:class:`gasungbi.eval.harness.GasungbiLM`),
- lm-eval's ``hf`` backend (transformers, float32) on the same checkpoint,
- lm-eval's ``local-completions`` client against ``gasungbi serve`` (token-id prompts; echo +
  logprobs + top_logprobs over the prompt),

and every request must agree: loglikelihoods within 1e-4, greedy flags, generations and accuracies
identical. Nothing is downloaded (the data sets are local JSONL files; offline mode is set).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported (by lm_eval)
os.environ["HF_HUB_OFFLINE"] = "1"

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from gasungbi.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from gasungbi.eval.harness import GasungbiLM, special_tokens  # noqa: E402
from gasungbi.infer.load import load_for_inference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the tasks' data_files are relative to it
TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
NAMES = ["gsb_mc", "gsb_ppl", "gsb_gen"]
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    old = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(old)


def _documents(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


# What the model is fitted on for a few steps: half of the questions with their answers (those become
# its greedy continuations, the other half stay guesses), the documents, and the Q/A format (its
# generations end at the "\n" stop string).
_QA = [f"Q: {d['question']} =\nA: {d['answer']}\n" for d in _documents("gen.jsonl")[::2]]
TRAINING_TEXT = ([f"{d['question']} {d['choices'][d['label']]}" for d in _documents("mc.jsonl")[::2]]
                 + [d["text"] for d in _documents("ppl.jsonl")] + ["".join(_QA), "".join(_QA[::-1])])


def _fit(model, tok, texts: list[str], steps: int = 30) -> None:
    ids = [tok.encode(t).ids for t in texts]
    x = torch.full((len(ids), max(map(len, ids))), 2)
    y = torch.full_like(x, -100)
    for i, t in enumerate(ids):
        x[i, :len(t)] = y[i, :len(t)] = torch.tensor(t)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print(f"fitted: loss {loss.item():.3f}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers DeepseekV3 (float32) with gasungbi's tokenizer, fitted a little on the tasks'
    texts, saved in the HF layout."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tok = train_tokenizer(TRAINING_TEXT * 3, 360)
    cfg = DeepseekV3Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                           moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=256, n_routed_experts=8,
                           num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                           first_k_dense_replace=1, initializer_range=0.25, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    _fit(model, tok, TRAINING_TEXT)
    path = tmp_path_factory.mktemp("lm_eval") / "tiny"
    model.save_pretrained(path)
    save_tokenizer(tok, path)
    return path


def evaluate(model, model_args=None, batch_size=4):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=NAMES, batch_size=batch_size,
                                   task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                   log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def ours(checkpoint):
    model = load_for_inference(checkpoint, "cpu", report=None)
    lm = GasungbiLM(model, load_tokenizer(checkpoint), special_tokens(checkpoint), batch_size=4)
    return evaluate(lm)


def compare(a: dict, b: dict, specials_in_text: bool = False) -> float:
    """Assert that two lm-eval runs agree request by request; returns the largest loglikelihood gap.

    ``specials_in_text``: ``b``'s generations keep special tokens as text, as gasungbi serve's
    completions do (``<think>``, ``<answer>`` are special tokens); they are removed before comparing
    with ``a``'s, decoded without them as lm-eval's hf backend decodes."""
    worst = 0.0
    for task in NAMES:
        sa = {s["doc_id"]: s for s in a["samples"][task]}
        sb = {s["doc_id"]: s for s in b["samples"][task]}
        assert sa.keys() == sb.keys() and sa, task
        for doc in sa:
            for ra, rb in zip(sa[doc]["resps"], sb[doc]["resps"], strict=True):
                va, vb = ra[0], rb[0]
                if isinstance(va, str):  # a generation
                    if specials_in_text:
                        vb = re.sub("|".join(map(re.escape, SPECIAL_TOKENS)), "", vb)
                    assert va == vb, (task, doc, va, vb)
                    continue
                if isinstance(va, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert bool(va[1]) == bool(vb[1]), (task, doc, va, vb)
                    va, vb = va[0], vb[0]
                assert abs(va - vb) <= TOL, (task, doc, va, vb)
                worst = max(worst, abs(va - vb))
    ra, rb = a["results"], b["results"]
    for task, metric in [("gsb_mc", "acc,none"), ("gsb_mc", "acc_norm,none"), ("gsb_gen", "exact_match,none")]:
        assert ra[task][metric] == rb[task][metric], (task, metric)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ra["gsb_ppl"][metric] == pytest.approx(rb["gsb_ppl"][metric], rel=1e-5), metric
    return worst


def test_tasks_are_nontrivial(ours):
    """The fixture exercises what the comparisons need: choices that are and are not the greedy
    continuation, generations cut at the stop string."""
    greedy = [r[0][1] for s in ours["samples"]["gsb_mc"] for r in s["resps"]]
    assert len(ours["samples"]["gsb_mc"]) >= 10 and any(greedy) and not all(greedy)
    assert len(ours["samples"]["gsb_ppl"]) >= 10
    gens = [s["resps"][0][0] for s in ours["samples"]["gsb_gen"]]
    assert len(gens) >= 10 and all(g and "\n" not in g for g in gens)
    assert 0 < ours["results"]["gsb_mc"]["acc,none"] < 1
    print("gasungbi:", {t: {k: v for k, v in r.items() if "," in k and "stderr" not in k}
                        for t, r in ours["results"].items()})


def test_matches_lm_eval_hf_backend(checkpoint, ours):
    hf = evaluate("hf", f"pretrained={checkpoint},dtype=float32,device=cpu")
    worst = compare(ours, hf)
    print(f"hf backend: largest loglikelihood gap {worst:.2e}")


def test_rolling_windows_and_an_empty_context_match_hf(checkpoint):
    """Texts longer than the context are scored in lm-eval's disjoint windows, a context too long is
    cut on the left, an empty context is the prefix (bos) token: all as lm-eval's hf backend, with a
    24-token context."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ours = GasungbiLM(load_for_inference(checkpoint, "cpu", report=None), load_tokenizer(checkpoint),
                      special_tokens(checkpoint), batch_size=3)
    ours.max_length = 24
    hf = HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=3, max_length=24)
    docs = [d["text"] for d in _documents("ppl.jsonl")]
    texts = [" ".join(docs[:4]), " ".join(docs[4:]), docs[0]]  # ~50-110 tokens: 3-5 windows each

    def rolling(i, text):
        return Instance("loglikelihood_rolling", {}, (text,), i)

    a = ours.loglikelihood_rolling([rolling(i, t) for i, t in enumerate(texts)], disable_tqdm=True)
    b = hf.loglikelihood_rolling([rolling(i, t) for i, t in enumerate(texts)], disable_tqdm=True)
    assert len(ours.tok_encode(texts[0])) > 3 * 24
    assert a == pytest.approx(b, abs=TOL)
    pairs = [("", "Snow is usually white"), ("", "Snow"), (docs[0] + " " + docs[2][:30], docs[2][30:])]
    assert len(ours.tok_encode("".join(pairs[2]))) > 24 + 1
    a = ours.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    b = hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=TOL)


def test_quantized_and_placed_models_score_too(checkpoint):
    """--quant and --experts-device reach the scoring forward: int8 weights (bf16 compute) move the
    loglikelihoods by a few percent, placement alone not at all."""
    from lm_eval.api.instance import Instance

    pairs = [(d["question"], " " + c) for d in _documents("mc.jsonl")[:3] for c in d["choices"]]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]

    def scores(**kw):
        lm = GasungbiLM(load_for_inference(checkpoint, "cpu", report=None, **kw), load_tokenizer(checkpoint),
                        special_tokens(checkpoint), batch_size=4)
        return [x[0] for x in lm.loglikelihood(reqs, disable_tqdm=True)]

    full, int8 = scores(), scores(quant="int8")
    assert full != int8 and int8 == pytest.approx(full, rel=0.1, abs=0.1)
    assert scores(experts_device="cpu") == pytest.approx(full, abs=1e-6)


def test_matches_local_completions_against_gasungbi_serve(checkpoint, ours, start_server):
    server = start_server(checkpoint, "--max-batch", "4")
    api = evaluate("local-completions",
                   f"model={checkpoint.name},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={checkpoint},tokenized_requests=True,max_length=256,max_retries=1", batch_size=1)
    worst = compare(ours, api, specials_in_text=True)
    print(f"local-completions via gasungbi serve: largest loglikelihood gap {worst:.2e}")


def test_cli_prints_the_table_and_writes_the_json(checkpoint, ours, tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "gasungbi", "eval", str(checkpoint), "--tasks", ",".join(NAMES),
                        "--include-path", str(TASKS), "--batch-size", "3", "--device", "cpu", "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gsb_mc" in r.stdout and "acc" in r.stdout and "bits_per_byte" in r.stdout, r.stdout
    saved = json.loads(out.read_text())["results"]
    for task, metric in [("gsb_mc", "acc,none"), ("gsb_mc", "acc_norm,none"), ("gsb_gen", "exact_match,none")]:
        assert saved[task][metric] == ours["results"][task][metric]
    assert saved["gsb_ppl"]["word_perplexity,none"] == pytest.approx(
        ours["results"]["gsb_ppl"]["word_perplexity,none"], rel=1e-5)


def test_cli_errors_are_one_line(checkpoint, monkeypatch, capsys):
    from gasungbi.cli import COMMANDS, main

    assert main(["eval", str(checkpoint), "--tasks", "gsb_nope", "--include-path", str(TASKS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task(s) gsb_nope" in err, err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    assert main(["eval", str(checkpoint), "--tasks", "gsb_mc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gasungbi[eval]'" in err, err
    # one eval family: the gym accuracy is eval-gym, eval-tasks stays as its alias
    assert COMMANDS["eval-tasks"][0] == COMMANDS["eval-gym"][0] and "alias of eval-gym" in COMMANDS["eval-tasks"][1]


def test_help_says_nothing_downloads(capsys):
    from gasungbi.cli import main

    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Nothing is downloaded" in text and "local Hugging Face cache" in text and "--include-path" in text
