"""Chat SFT: the template matches transformers' apply_chat_template, only assistant tokens are
trained, packing, resume, and bad input."""

import json

import pytest
import torch

from gasungbi import build_model, get_preset, save_model
from gasungbi.data.tokenizer import train_tokenizer
from gasungbi.data.conventions import CHAT_TEMPLATE, render_chat
from gasungbi.data.sft import IGNORE, SFTDataError, SFTLoader, read_conversations, tokenize_conversation
from gasungbi.post.sft import sft
from gasungbi.train.trainer import TrainConfig

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>2 and 2</think><answer>4</answer>"},
        {"role": "user", "content": "안녕 🤖"}, {"role": "assistant", "content": "hi"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    docs = [f"Q: what is {a} + {b}? A: {a + b}. 안녕 🤖 def f(x): return x" for a in range(30) for b in range(10)]
    tok = train_tokenizer(docs, 400)
    from gasungbi.data.tokenizer import save_tokenizer
    save_tokenizer(tok, root / "tok", chat_template=CHAT_TEMPLATE)
    model = build_model(get_preset("debug").replace(vocab_size=tok.get_vocab_size()), seed=0)
    save_model(model, root / "ckpt", tokenizer=root / "tok")
    chats = root / "chats.jsonl"
    with open(chats, "w") as f:
        for a in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} + 1?"},
                                             {"role": "assistant", "content": f"<answer>{a + 1}</answer>"}]}) + "\n")
    return root, tok


def test_template_matches_transformers(ckpt):
    transformers = pytest.importorskip("transformers")
    root, tok = ckpt
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "ckpt")
    for gen in (True, False):
        text = hf_tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=gen)
        assert text == render_chat(CONV, add_generation_prompt=gen)
    ids = hf_tok.apply_chat_template(CONV, tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenize_conversation(tok, CONV)[0]


def test_only_assistant_tokens_are_targets(ckpt):
    _, tok = ckpt
    ids, mask = tokenize_conversation(tok, CONV)
    assert ids == tok.encode(render_chat(CONV, add_generation_prompt=False)).ids
    trained = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "<think>2 and 2</think><answer>4</answer><|end|>hi<|end|>"


def test_loader_packs_masks_and_resumes(ckpt):
    root, tok = ckpt
    a = SFTLoader(root / "chats.jsonl", tok, "train", 4, 64, seed=3)
    x, y = a.next_batch()
    assert x.shape == y.shape == (4, 64)
    assert (y == IGNORE).any() and (y != IGNORE).any()
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(3)]
    b = SFTLoader(root / "chats.jsonl", tok, "train", 4, 64, seed=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, (b.next_batch() for _ in range(3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    val = SFTLoader(root / "chats.jsonl", tok, "val", 4, 64, seed=3)
    assert val.num_windows >= 1
    # under torchrun every rank gets as many validation batches (its forwards are collective)
    one = list(SFTLoader(root / "chats.jsonl", tok, "train", 2, 64, seed=3).eval_batches(3))
    ranks = [list(SFTLoader(root / "chats.jsonl", tok, "train", 2, 64, seed=3, rank=r, world_size=2).eval_batches(3))
             for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    order = [b for pair in zip(*ranks) for b in pair]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(order, one)) and len(one) == 3


def test_sft_run_lowers_assistant_loss_and_resumes_exactly(ckpt, tmp_path):
    root, _ = ckpt
    base = dict(init_from=str(root / "ckpt"), data=str(root / "chats.jsonl"), batch_size=4,
                seq_len=64, max_steps=6, warmup_steps=1, eval_interval=0, eval_batches=2, log_interval=1,
                progress=False, device="cpu", lr=3e-3, sample_tokens=2)
    straight = sft(TrainConfig(out_dir=str(tmp_path / "a"), **base))
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "lm_loss" in l]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"]
    assert straight["val_loss"] > 0 and straight["val_bpb"] is None
    sft(TrainConfig(out_dir=str(tmp_path / "b"), stop_after=3, **base))
    resumed = sft(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    from safetensors.torch import load_file
    wa = load_file(f"{straight['checkpoint']}/model.safetensors")
    wb = load_file(f"{resumed['checkpoint']}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_sft_input_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: no assistant message"):
        read_conversations(p)
    p.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: each message needs a role"):
        read_conversations(p)
    p.write_text("not json\n")
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: not JSON"):
        read_conversations(p)
    with pytest.raises(SFTDataError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")


def test_non_utf8_sft_file_is_named(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(SFTDataError, match="latin1.jsonl is not UTF-8"):
        read_conversations(p)


def test_loader_says_when_it_cuts_conversations(ckpt, recwarn):
    """A row shorter than a conversation cuts its end (the answer): the loader says how many, and
    says nothing when every conversation fits."""
    root, tok = ckpt
    longest = max(len(tokenize_conversation(tok, c)[0]) for c in read_conversations(root / "chats.jsonl"))
    SFTLoader(root / "chats.jsonl", tok, "train", 2, longest - 1, seed=0)
    assert not [w for w in recwarn if "were cut" in str(w.message)]
    with pytest.warns(UserWarning, match=r"chats.jsonl: \d+ of \d+ train conversations are longer than"):
        SFTLoader(root / "chats.jsonl", tok, "train", 2, longest - 2, seed=0)
