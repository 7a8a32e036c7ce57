"""The native decode kernels against the PyTorch reference they replace, and the engine built on them."""

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

import gasungbi
from gasungbi.infer import native
from gasungbi.infer.engine import Engine
from gasungbi.infer.quant import dequantize_int8, quantize_int8, quantize_state_dict
from gasungbi.infer.quant_modules import from_quantized_state_dict
from gasungbi.model.moe import dispatch
from gasungbi.model.transformer import from_state_dict


def test_kernels_build_here():
    """On Linux x86/ARM with a compiler the kernels must build: a silent fallback would hide a slow engine."""
    if platform.system() != "Linux" or shutil.which("c++") is None:
        pytest.skip("the native kernels are built on Linux with a C++ compiler")
    assert native.available()


def q8(x: torch.Tensor) -> torch.Tensor:
    """What the int8 kernels multiply: x itself, or on the VNNI path x quantized per block of 32 to
    int8 with scale amax/127 (round half to even), as llama.cpp's Q8_0 quantizes activations."""
    if not (native.q8_activations() and x.shape[-1] % 64 == 0):
        return x
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(x.shape)


@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (3, 37, 64), (16, 130, 96)])
def test_linear_matches_torch(m, n, k):
    g = torch.Generator().manual_seed(m * n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    exact = F.linear(x.double(), w.double())
    bound = k * 2.0**-24 * F.linear(x.abs().double(), w.abs().double())  # fp32 summation error bound
    assert ((native.linear(x, w).double() - exact).abs() <= bound + 1e-30).all()
    q, s = quantize_int8(w)
    torch.testing.assert_close(native.linear(x, q, s.float()), F.linear(q8(x), dequantize_int8(q, s).float()),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 16])
def test_experts_match_the_reference_dispatch(m):
    E, I, d, K = 8, 64, 64, 3
    g = torch.Generator().manual_seed(m)
    gate, up, down = (torch.randn(*s, generator=g) * 0.1 for s in ((E, I, d), (E, I, d), (E, d, I)))
    x = torch.randn(m, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(m)])
    idx[0] = torch.tensor([5, 1, 6])  # expert order differs from choice order
    w = torch.rand(m, K, generator=g)

    def reference(gate, up, down, act=lambda t: t):
        def expert(e, xs):
            return act(F.silu(act(xs) @ gate[e].t()) * (act(xs) @ up[e].t())) @ down[e].t()
        return dispatch(expert, x, idx, w, torch.bincount(idx.reshape(-1), minlength=E))

    shared = [torch.randn(*s, generator=g) * 0.1 for s in ((128, d), (128, d), (d, 128))]

    def shared_ref(gate, up, down, act=lambda t: t):
        return act(F.silu(act(x) @ gate.t()) * (act(x) @ up.t())) @ down.t()

    torch.testing.assert_close(native.experts(x, [gate, up, down], [], idx, w), reference(gate, up, down),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.experts(x, [gate, up, down], shared, idx, w),
                               reference(gate, up, down) + shared_ref(*shared), rtol=1e-5, atol=1e-5)
    routed_q, shared_q = ([quantize_int8(t) for t in ts] for ts in ((gate, up, down), shared))
    got = native.experts(x, [q for q, _ in routed_q] + [s.float() for _, s in routed_q],
                         [q for q, _ in shared_q] + [s.float() for _, s in shared_q], idx, w)
    want = (reference(*(dequantize_int8(q, s).float() for q, s in routed_q), act=q8)
            + shared_ref(*(dequantize_int8(q, s).float() for q, s in shared_q), act=q8))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 2)])
def test_mla_attention_matches_the_pytorch_path(B, T):
    """The native absorbed attention gives PyTorch's (four batched matmuls, mask, softmax) on a
    strided cache window whose mask hides left padding and the slots after each query."""
    from gasungbi.model.attention import MLA

    cfg = gasungbi.get_preset("debug")
    mla = MLA(cfg, 0).eval()
    H, dn, dr, dv, r, S = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.v_dim, mla.kv_lora_rank, 40
    g = torch.Generator().manual_seed(B * 10 + T)
    q_nope, q_pe = torch.randn(B, T, H, dn + dr, generator=g).split([dn, dr], dim=-1)  # views, as MLA's
    cache, rope = torch.randn(B + 1, 64, r, generator=g), torch.randn(B + 1, 64, dr, generator=g)
    kv, k_pe = cache[1:, :S], rope[1:, :S]  # a window of a longer cache, as the engine's views
    w = torch.randn(H, dn + dv, r, generator=g) / r**0.5
    w_uk, w_uv = w[:, :dn], w[:, dn:]
    slots, pad = torch.arange(S - T - 3, S - 3), torch.tensor([3 * b for b in range(B)])
    key = torch.arange(S)
    mask = ((key <= slots[None, :, None]) & (key >= pad[:, None, None]))[:, None]  # (B, 1, T, S)
    want = MLA._absorbed(mla, q_nope, q_pe, kv, k_pe, w_uk, w_uv, 0, mask)
    got = native.NativeMLA._absorbed(mla, q_nope, q_pe, kv, k_pe, w_uk, w_uv, 0, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernels_name_bad_input():
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and w \\[N, K\\]"):
        native.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        e = torch.randn(4, 8, 16)
        native.experts(torch.randn(1, 16), [e, e, torch.randn(4, 16, 8)], [], torch.tensor([[9]]), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="mla_attend: mismatched shapes"):
        q, kv, w = torch.randn(1, 1, 2, 4), torch.randn(1, 5, 8), torch.randn(2, 4, 8)
        torch.ops.gasungbi.mla_attend(q, q, kv, kv[..., :3], w, w, torch.ones(1, 1, 1, 5, dtype=torch.bool), 1.0)


def test_extension_name_is_keyed_by_the_instruction_sets(tmp_path):
    """The kernels are built with -march=native: two CPUs whose flags differ (here one without
    VNNI) get two builds, the same flags (in any order) one; the flags are read from cpuinfo's
    x86 or ARM line, with a stand-in where there is none."""
    vnni = ["fpu", "avx2", "avx512f", "avx512_vnni", "fma"]
    assert native.extension_name(vnni) == native.extension_name(vnni[::-1])
    assert native.extension_name(vnni) != native.extension_name([f for f in vnni if f != "avx512_vnni"])
    assert native.extension_name(vnni, b"one source") != native.extension_name(vnni, b"another")
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: sse avx512f avx2\n\nprocessor\t: 1\n"
                                  "flags\t\t: sse avx512f avx2\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert native.cpu_flags(tmp_path / "x86") == ["avx2", "avx512f", "sse"]
    assert native.cpu_flags(tmp_path / "arm") == ["asimd", "fp", "sve"]
    assert native.cpu_flags(tmp_path / "absent")


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_engine_steps_equal_a_full_forward(one_thread, mode):
    """The engine's native steps (fixed-shape window, absorbed MLA) give the logits of a plain
    forward over the whole sequence (no cache, PyTorch kernels) for every position: to rounding in
    fp32; in int8 against the same int8 values dequantized, within what quantizing the activations
    to Q8 (when the kernels do) moves them: 5% of the largest logit."""
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
        if mode == "int8" and native.q8_activations():
            assert (logits - ref[:, t]).abs().max() <= 0.05 * ref[:, t].abs().max()
        else:
            torch.testing.assert_close(logits, ref[:, t], rtol=1e-4, atol=1e-4)


def test_compiled_step_gives_the_eager_tokens(one_thread):
    """The compiled decode step (inductor) decodes the same greedy tokens as the eager one, across
    a window change (64 slots -> 75, the cache's length), a second generation reuses the compiled
    graphs, and one of another length (a longer cache: the same 64-slot window, other strides)
    compiles its own; steps that compiled are counted apart from the decode speed."""
    from gasungbi.infer.engine import compiled_step
    from gasungbi.infer.generate import generate, stream

    def drain(s):
        for _ in s:
            pass
        return s.completions

    cfg = gasungbi.get_preset("debug").replace(vocab_size=256, max_position_embeddings=160, num_hidden_layers=2)
    model = gasungbi.build_model(cfg, seed=1).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    eager = generate(model, prompts, max_new_tokens=70, stop_tokens=())
    first = stream(model, prompts, max_new_tokens=70, stop_tokens=(), compile=True)
    assert [c.tokens for c in drain(first)] == [c.tokens for c in eager]
    shapes = set(compiled_step(model).shapes)
    assert {key[:3] for key in shapes} == {(2, 1, 64), (2, 1, 75)}  # windows: 64, then the cache length (5 + 70)
    # the two steps that compiled are left out of the decode speed, and counted apart
    st = first.stats
    assert st.compile_steps == 2 and st.compile_s == pytest.approx(compiled_step(model).compile_s)
    assert st.decode_tokens_per_s == pytest.approx(2 * (70 - 1 - 2) / st.decode_s)
    again = stream(model, prompts, max_new_tokens=70, stop_tokens=(), compile=True)
    assert [c.tokens for c in drain(again)] == [c.tokens for c in eager] and set(compiled_step(model).shapes) == shapes
    assert again.stats.compile_steps == 0 and again.stats.compile_s == 0
    # another length: the same window over a longer cache (other strides) compiles anew (the
    # stream stops before the window grows)
    longer = stream(model, prompts, max_new_tokens=80, stop_tokens=(), compile=True)
    for _ in zip(range(2 * 55), longer):  # a delta per row and token: 55 tokens, slots up to 60
        pass
    assert [c.tokens for c in longer.completions] == [c.tokens[:55] for c in eager]
    assert len(compiled_step(model).shapes) == 3
    # the steps run without guards, and read the parameters at each call: an in-place update (an
    # optimizer step) and a reassigned tensor are seen, with no new compilation
    step = compiled_step(model)
    assert all(step.shapes.values()), "the CPU step should be called directly"
    compiles = step.compiles
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    model.model.layers[0].input_layernorm.weight = torch.nn.Parameter(torch.rand(cfg.hidden_size) + 0.5)
    eager2 = generate(model, prompts, max_new_tokens=70, stop_tokens=())
    compiled2 = generate(model, prompts, max_new_tokens=70, stop_tokens=(), compile=True)
    assert [c.tokens for c in eager2] != [c.tokens for c in eager]
    assert [c.tokens for c in compiled2] == [c.tokens for c in eager2] and step.compiles == compiles


def test_direct_step_internals_hold_on_this_torch(monkeypatch):
    """The torch internals the direct step uses pass their check on the installed torch (a fresh
    check, not one an earlier test made), so the CPU step is called directly here."""
    from gasungbi.infer import direct_step

    monkeypatch.setattr(direct_step, "_verdict", None)
    assert direct_step._check() is None and direct_step.usable()


def test_compiled_step_falls_back_to_the_public_api(one_thread, monkeypatch):
    """Where the torch internals fail their check (here dynamo's cache entries cannot be read),
    the step warns once and runs torch.compile's public path, guards skipped through
    ``set_stance``: the same tokens."""
    import torch._C._dynamo.eval_frame

    import gasungbi.infer.engine as E
    from gasungbi.infer import direct_step
    from gasungbi.infer.generate import generate

    monkeypatch.delattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list")
    monkeypatch.setattr(direct_step, "_verdict", None)
    cfg = gasungbi.get_preset("debug").replace(vocab_size=256, max_position_embeddings=160, num_hidden_layers=2)
    model = gasungbi.build_model(cfg, seed=2).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    eager = generate(model, prompts, max_new_tokens=70, stop_tokens=())
    with pytest.warns(UserWarning, match="torch internals unusable"):
        E._COMPILED[model] = E.CompiledStep(torch.device("cpu"), backend="eager")
    compiled = generate(model, prompts, max_new_tokens=70, stop_tokens=(), compile=True)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    assert list(E.compiled_step(model).shapes.values()) == [None, None]


def test_direct_step_is_keyed_by_the_state_guards_check(one_thread):
    """A directly called step is not reused once what dynamo's skipped guards would check has
    changed: another thread count, default dtype or autocast state compiles its own entry (a new
    direct function), and going back reuses the first one without compiling."""
    import contextlib

    import gasungbi.infer.engine as E
    from gasungbi.infer.generate import generate

    cfg = gasungbi.get_preset("debug").replace(vocab_size=256, max_position_embeddings=64, num_hidden_layers=1)
    model = gasungbi.build_model(cfg, seed=5).eval()
    step = E._COMPILED[model] = E.CompiledStep(torch.device("cpu"), backend="eager")
    prompts = [[3, 4, 5], [6, 7]]

    def run():
        return [c.tokens for c in generate(model, prompts, max_new_tokens=4, stop_tokens=(), compile=True)]

    first = run()
    assert step.compiles == 1
    (key,) = step.shapes
    @contextlib.contextmanager
    def changed(set_, get, value):
        before = get()
        set_(value)
        try:
            yield
        finally:
            set_(before)

    changes = {"threads": lambda: changed(torch.set_num_threads, torch.get_num_threads, 2),
               "default dtype": lambda: changed(torch.set_default_dtype, torch.get_default_dtype, torch.float64),
               "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for n, (what, change) in enumerate(changes.items(), start=2):
        with change():
            run()
        assert step.compiles == n, what
        assert len(step.shapes) == n and len({id(f) for f in step.shapes.values()}) == n, what
    assert run() == first and step.compiles == len(changes) + 1  # the first state: its own entry again
    assert all(step.shapes.values()), "the CPU steps should be called directly"


def test_compiled_step_with_a_graph_break(one_thread):
    """A step that is not one graph (here the head breaks it) warns and is compiled in pieces: the
    same tokens as eager."""
    from gasungbi.infer.engine import compiled_step
    from gasungbi.infer.generate import generate

    cfg = gasungbi.get_preset("debug").replace(vocab_size=256, max_position_embeddings=64, num_hidden_layers=1)
    model = gasungbi.build_model(cfg, seed=3).eval()
    head = model.lm_head.forward

    def breaking_head(x):
        torch._dynamo.graph_break()
        return head(x)

    model.lm_head.forward = breaking_head
    eager = generate(model, [[3, 4, 5]], max_new_tokens=12, stop_tokens=())
    with pytest.warns(UserWarning, match="not one graph"):
        compiled = generate(model, [[3, 4, 5]], max_new_tokens=12, stop_tokens=(), compile=True)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    step = compiled_step(model)
    assert list(step.shapes.values()) == [step.fn]  # called with its guards


def test_step_is_one_graph_without_native_kernels(one_thread, monkeypatch):
    """Without the native kernels (bf16, CUDA, GASUNGBI_NATIVE=0) the routed experts of a compiled
    step are traced with no host sync, so the step is one graph (no warning: traced by dynamo with
    the eager backend) with eager's tokens, batch 1 (gathered pairs) and 4 (all experts, a dense
    combine); both forms equal the sorted dispatch."""
    import warnings

    import gasungbi.infer.engine as E
    from gasungbi.infer import native
    from gasungbi.infer.generate import generate
    from gasungbi.model.moe import Experts, dispatch, expert_counts

    monkeypatch.setattr(native, "_built", False)
    cfg = gasungbi.get_preset("debug").replace(vocab_size=256, max_position_embeddings=64, num_hidden_layers=2)
    model = gasungbi.build_model(cfg, seed=4).eval()
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    x, g = torch.randn(4, cfg.hidden_size), torch.Generator().manual_seed(0)
    for n in (1, 4):  # n * K = 2 < E = 8 gathers; 8 runs all experts
        idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:2] for _ in range(n)])
        w = torch.rand(n, 2, generator=g)
        ref = dispatch(experts.expert, x[:n], idx, w, expert_counts(idx, cfg.n_routed_experts))
        torch.testing.assert_close(experts.traced(x[:n], idx, w), ref, rtol=1e-5, atol=1e-6)
    prompts = [[3, 4, 5], [6, 7], [8], [9, 10, 11, 12]]
    for rows in (prompts[:1], prompts):
        eager = generate(model, rows, max_new_tokens=6, stop_tokens=())
        E._COMPILED[model] = E.CompiledStep(torch.device("cpu"), backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a graph break would warn "not one graph"
            compiled = generate(model, rows, max_new_tokens=6, stop_tokens=(), compile=True)
        assert [c.tokens for c in compiled] == [c.tokens for c in eager]
        assert all(callable(s) and s is not E._COMPILED[model].fn for s in E._COMPILED[model].shapes.values())
