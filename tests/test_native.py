"""The native decode kernels against the PyTorch reference they replace, and the engine built on them."""

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

import gasungbi
from gasungbi.infer import native
from gasungbi.infer.engine import Engine
from gasungbi.infer.quant import dequantize_int8, from_quantized_state_dict, quantize_int8, quantize_state_dict
from gasungbi.model.moe import dispatch
from gasungbi.model.transformer import from_state_dict


def test_kernels_build_here():
    """On Linux x86/ARM with a compiler the kernels must build: a silent fallback would hide a slow engine."""
    if platform.system() != "Linux" or shutil.which("c++") is None:
        pytest.skip("the native kernels are built on Linux with a C++ compiler")
    assert native.available()


@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (3, 37, 64), (16, 130, 96)])
def test_linear_matches_torch(m, n, k):
    g = torch.Generator().manual_seed(m * n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    torch.testing.assert_close(native.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    q, s = quantize_int8(w)
    torch.testing.assert_close(native.linear(x, q, s.float()), F.linear(x, dequantize_int8(q, s).float()),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 16])
def test_experts_match_the_reference_dispatch(m):
    E, I, d, K = 8, 48, 64, 3
    g = torch.Generator().manual_seed(m)
    gate, up, down = (torch.randn(*s, generator=g) * 0.1 for s in ((E, I, d), (E, I, d), (E, d, I)))
    x = torch.randn(m, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(m)])
    idx[0] = torch.tensor([5, 1, 6])  # expert order differs from choice order
    w = torch.rand(m, K, generator=g)

    def reference(gate, up, down):
        def expert(e, xs):
            return (F.silu(xs @ gate[e].t()) * (xs @ up[e].t())) @ down[e].t()
        return dispatch(expert, x, idx, w, torch.bincount(idx.reshape(-1), minlength=E))

    torch.testing.assert_close(native.experts(x, gate, up, down, idx, w), reference(gate, up, down),
                               rtol=1e-5, atol=1e-5)
    (gq, gs), (uq, us), (dq, ds) = (quantize_int8(t) for t in (gate, up, down))
    got = native.experts(x, gq, uq, dq, idx, w, (gs.float(), us.float(), ds.float()))
    want = reference(*(dequantize_int8(q, s).float() for q, s in ((gq, gs), (uq, us), (dq, ds))))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kernels_name_bad_input():
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and w \\[N, K\\]"):
        native.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        e = torch.randn(4, 8, 16)
        native.experts(torch.randn(1, 16), e, e, torch.randn(4, 16, 8), torch.tensor([[9]]), torch.ones(1, 1))


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_engine_steps_equal_a_full_forward(one_thread, mode):
    """The engine's native steps (fixed-shape window, absorbed MLA) give the logits of a plain
    forward over the whole sequence (no cache, PyTorch kernels) for every position."""
    cfg = gasungbi.get_preset("debug").replace(vocab_size=256, max_position_embeddings=96)
    model = reference = gasungbi.build_model(cfg, seed=0).eval()
    if mode == "int8":  # the reference: the same int8 values dequantized, in fp32 (no bf16 activations)
        qsd = quantize_state_dict(model, "int8", 32)
        model = from_quantized_state_dict(cfg, qsd)
        deq = {k: dequantize_int8(v, qsd[k + "_scales"]).float() for k, v in qsd.items() if v.dtype == torch.int8}
        reference = from_state_dict(cfg, {k: deq.get(k, v) for k, v in qsd.items() if not k.endswith("_scales")})
    seq = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = reference(seq)  # (2, 20, V): 40 tokens per product, the PyTorch path
        engine = Engine(model, 2, 70)
        first, _ = engine.join(seq[:, :6].tolist())  # 12 tokens: native too
        got = [first] + [engine.step(seq[:, t]) for t in range(6, 20)]
    for t, logits in enumerate(got, start=5):
        torch.testing.assert_close(logits, ref[:, t], rtol=1e-4, atol=1e-4)
