"""The planner: catalog, training cost (hand-computed and DeepSeek-V3's published figure), serving
ceilings against published measurements, fits, KV bytes, and the ``gasungbi plan`` command."""

import json
import os
import subprocess
import sys

import pytest

from gasungbi.cli import main
from gasungbi.config import ModelConfig, to_hf_config
from gasungbi.presets import get_preset
from gasungbi.plan.all_to_all import estimate_expert_parallel, node_limit_of
from gasungbi.plan.catalog import CatalogError, Gpu, load_catalog, parse_hardware
from gasungbi.plan.counts import CountModel, kv_bytes_per_token, mha_kv_bytes_per_token, parse_tokens
from gasungbi.plan.local import local_decode
from gasungbi.plan.serving import Setup, estimate_serve
from gasungbi.plan.training import (CALIBRATED_DENSE_MFU, CALIBRATED_FP8_MFU, CALIBRATED_MFU, DEEPSEEK_V3,
                                    FP8_TRAINING_SPEEDUP, estimate_train, implied_mfu)

PNG = b"\x89PNG\r\n\x1a\n"
V3 = get_preset("deepseek-v3-671b")


@pytest.fixture(autouse=True)
def no_user_catalog(tmp_path, monkeypatch):
    """Keep the developer's ~/.config/gasungbi/hardware.json out of the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture
def catalog():
    return load_catalog()


def plan(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gasungbi", "plan", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------
# catalog
# ---------------------------------------------------------------------------------------------

def test_catalog_has_the_hardware_and_a_source_for_every_figure(catalog):
    for name in ("h100-sxm", "h800", "h20", "h200", "b200", "a100-80gb", "l40s", "rtx4090", "rtx3090"):
        gpu = catalog.gpus[name]
        for f in ("memory_gb", "bandwidth_gbs", "bf16_tflops", "fp8_tflops", "price_per_hour", "nvlink_gbs",
                  "network_gbs"):
            assert gpu.source.get(f), f"{name}.{f} has no source"
    assert catalog.gpus["a100-80gb"].fp8_tflops is None
    assert (catalog.gpus["h800"].nvlink_gbs, catalog.gpus["h800"].network_gbs) == (400, 50)  # NVIDIA spec; IB 50 GB/s: DeepSeek-V3 Sec. 3.2.1
    assert (catalog.gpus["h100-sxm"].nvlink_gbs, catalog.gpus["h100-sxm"].network_gbs) == (900, 50)
    for name, bw in (("ddr5-2ch-5600", 89.6), ("ddr5-8ch-4800", 307.2), ("ddr5-12ch-4800", 460.8),
                     ("ddr5-12ch-5600", 537.6)):
        m = catalog.memory[name]
        assert m.bandwidth_gbs == pytest.approx(bw) == m.channels * m.mts * 8 / 1000
        for f in ("bandwidth_gbs", "memory_gb", "price_per_gb", "platform_price", "tflops"):
            assert m.source.get(f), f"{name}.{f} has no source"


def test_user_catalog_adds_and_overrides(tmp_path, monkeypatch):
    mine = tmp_path / "my.json"
    mine.write_text(json.dumps({"gpus": {
        "h100-sxm": {"price_per_hour": 1.25},
        "mygpu": {"memory_gb": 32, "bandwidth_gbs": 1000, "bf16_tflops": 100, "price_per_hour": 0.5,
                  "source": "my own benchmark"}},
        "memory": {"ddr5-4ch-6400": {"channels": 4, "mts": 6400, "memory_gb": 256, "price_per_gb": 3}}}))
    cat = load_catalog([mine])
    assert cat.gpus["h100-sxm"].price_per_hour == 1.25
    assert "my.json" in cat.gpus["h100-sxm"].source["price_per_hour"]
    assert cat.gpus["h100-sxm"].bandwidth_gbs == 3350  # untouched fields kept
    assert cat.lookup("MyGPU").source["bandwidth_gbs"] == "my own benchmark"
    assert cat.memory["ddr5-4ch-6400"].bandwidth_gbs == pytest.approx(204.8)  # channels x MT/s x 8
    # the per-user file is read too
    cfg_file = tmp_path / "config" / "gasungbi" / "hardware.json"
    cfg_file.parent.mkdir(parents=True)
    cfg_file.write_text(json.dumps({"gpus": {"h800": {"price_per_hour": 1.0}}}))
    assert load_catalog().gpus["h800"].price_per_hour == 1.0


@pytest.mark.parametrize("entry, message", [
    ({"memory_gb": 32, "bandwidth_gbs": "fast", "bf16_tflops": 1, "price_per_hour": 1}, "gpus.bad.bandwidth_gbs"),
    ({"memory_gb": 32, "bandwith_gbs": 1, "bf16_tflops": 1, "price_per_hour": 1}, "unknown field 'bandwith_gbs'"),
    ({"memory_gb": 32, "bf16_tflops": 1, "price_per_hour": 1}, "missing field 'bandwidth_gbs'"),
    ({"memory_gb": -1, "bandwidth_gbs": 1, "bf16_tflops": 1, "price_per_hour": 1}, "gpus.bad.memory_gb"),
])
def test_user_catalog_errors_name_the_field(tmp_path, entry, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gpus": {"bad": entry}}))
    with pytest.raises(CatalogError, match=message.replace(".", r"\.")):
        load_catalog([bad])
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="invalid JSON"):
        load_catalog([bad])


def test_parse_hardware(catalog):
    hw = parse_hardware("2x RTX4090 + ddr5-8ch-4800", catalog)
    assert (hw.gpu.key, hw.gpu_count, hw.memory.key, hw.memory_count) == ("rtx4090", 2, "ddr5-8ch-4800", 1)
    hw = parse_hardware("8x h200", catalog)
    assert (hw.gpu.key, hw.gpu_count, hw.memory) == ("h200", 8, None)
    assert parse_hardware("4090", catalog).gpu.key == "rtx4090"
    with pytest.raises(CatalogError, match="unknown hardware 'h900'; known: h100-sxm"):
        parse_hardware("h900", catalog)
    with pytest.raises(CatalogError, match="two GPU types"):
        parse_hardware("h100 + h200", catalog)
    assert catalog.match_device("NVIDIA H100 80GB HBM3").key == "h100-sxm"
    assert catalog.match_device("cpu") is None


def test_parse_tokens():
    assert parse_tokens("14.8T") == pytest.approx(14.8e12)
    assert parse_tokens("500B") == 500e9 and parse_tokens("2M") == 2e6
    assert parse_tokens("1000") == 1000 and parse_tokens("1e9") == 1e9 and parse_tokens("10k") == 1e4
    for bad in ("abc", "", "1.2X", "-5", "0"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def test_train_hand_computed():
    # Dense MHA: d=64, 2 layers, 4 heads of 16, FFN 128, vocab 512 (untied).
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, n_routed_experts=0, rope_interleave=False)
    per_layer = 64 * 64 * 4 + 3 * 64 * 128 + 2 * 64   # q,k,v,o + SwiGLU + 2 norms = 16384 + 24576 + 128
    n = 2 * per_layer + 64 + 512 * 64                   # + final norm + output head (embedding excluded)
    attention = 2 * 2 * 4 * (2 * 16) * 256              # 2 x layers x heads x (qk + v) x T, forward
    fpt = 6 * n + 3 * attention                          # = 1,083,264
    assert fpt == 1_083_264
    gpu = Gpu("toy", "toy", memory_gb=10, bandwidth_gbs=100, bf16_tflops=100, fp8_tflops=None, price_per_hour=2.0)
    est = estimate_train(cfg, 1e9, gpu, count=4, mfu=0.5, seq_len=256)
    gpu_hours = 1e9 * fpt / (0.5 * 100e12) / 3600      # = 6.0180 GPU-hours
    assert est.flops_per_token == fpt
    assert est.gpu_hours == pytest.approx(gpu_hours)
    assert est.days == pytest.approx(gpu_hours / 4 / 24)
    assert est.dollars == pytest.approx(2.0 * gpu_hours)


def test_deepseek_v3_published_cost_is_reproduced(catalog):
    d = DEEPSEEK_V3
    est = estimate_train(V3, d["tokens"], catalog.gpus["h800"], 2048, seq_len=4096, precision="fp8")
    assert est.gpu_hours == pytest.approx(d["pretrain_gpu_hours"], rel=0.10)
    assert est.dollars == pytest.approx(d["pretrain_usd"], rel=0.10)
    # The default is the MFU the published figure implies under our FLOP count, rounded; BF16 takes
    # the published FP8 speed-up longer.
    h800 = catalog.gpus["h800"]
    implied = implied_mfu(V3, d["tokens"], d["pretrain_gpu_hours"], h800.fp8_tflops, 4096)
    assert implied == pytest.approx(CALIBRATED_FP8_MFU, abs=0.0005)
    assert CALIBRATED_MFU == pytest.approx(implied * h800.fp8_tflops / h800.bf16_tflops / FP8_TRAINING_SPEEDUP,
                                           abs=0.0005)


def test_dense_models_default_to_the_dense_calibration(catalog):
    from gasungbi.plan.backtest import run_backtest

    h100 = catalog.gpus["h100-sxm"]
    # the constant is the one the backtest derives from Llama 3.1 405B's published hours
    assert run_backtest(catalog).constants["train_dense"] == pytest.approx(CALIBRATED_DENSE_MFU, abs=0.0005)
    dense, counted = get_preset("llama-small"), CountModel(params=8e9, active=8e9)
    for model in (dense, counted):
        est = estimate_train(model, 1e12, h100, 8)
        assert est.mfu == CALIBRATED_DENSE_MFU and "Llama 3.1 405B" in est.basis
        fp8 = estimate_train(model, 1e12, h100, 8, precision="fp8")  # 1.43x faster than BF16
        assert fp8.gpu_hours == pytest.approx(est.gpu_hours / FP8_TRAINING_SPEEDUP)
    for moe in (V3, CountModel(params=671e9, active=37e9)):
        est = estimate_train(moe, 1e12, h100, 8)
        assert est.mfu == CALIBRATED_MFU and "DeepSeek-V3" in est.basis


def test_expert_parallel_bytes_by_hand():
    # debug preset: hidden 64, top-2 of 8 experts, 3 layers (the first dense) + 1 MTP module = 3 MoE layers.
    cfg = get_preset("debug")
    assert (cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts) == (64, 2, 8)
    gpu = Gpu("toy", "toy", memory_gb=10, bandwidth_gbs=100, bf16_tflops=100, fp8_tflops=None, price_per_hour=1.0,
              nvlink_gbs=4, network_gbs=1)  # NVLink 2 GB/s each way
    est = estimate_train(cfg, 1e9, gpu, count=4, mfu=0.5, seq_len=256)
    # EP 4 over nodes of 2 GPUs: 2 nodes. A copy is 64 x (1 byte fp8 dispatch + 2 bytes bf16 combine) = 192 bytes.
    plain = estimate_expert_parallel(cfg, est, gpu, 4, gpus_per_node=2, two_hop=False)
    assert (plain.nodes, plain.moe_layers) == (2, 3)
    assert plain.cross_node_copies == 1.0      # 2 slots x (4 - 2)/4
    assert plain.within_node_copies == 0.5     # 2 slots x (2 - 1)/4
    assert (plain.cross_node_bytes, plain.within_node_bytes) == (192, 96)
    # Two hops: distinct nodes among 2 uniform draws over 2 nodes = 2 x (1 - 1/4) = 1.5, half of them remote;
    # every slot not on the landing GPU (1 of 2) takes an NVLink hop: 2 x 1/2 = 1 copy.
    ep = estimate_expert_parallel(cfg, est, gpu, 4, gpus_per_node=2)
    assert ep.cross_node_copies == 0.75 and ep.within_node_copies == 1.0
    assert (ep.cross_node_bytes, ep.within_node_bytes) == (144, 192)
    # per MoE layer: network 144 B / 1 GB/s = 144 ns, NVLink 192 B / 2 GB/s = 96 ns, run at once: 144 ns;
    # x 3 MoE layers x 2 (forward and backward)
    assert ep.comm_s_per_token == pytest.approx(2 * 3 * 144e-9)
    compute = est.flops_per_token / (0.5 * 100e12)
    assert ep.compute_s_per_token == pytest.approx(compute)
    assert ep.overlap_ratio == pytest.approx(compute / (2 * 3 * 144e-9))
    assert ep.comm_s_per_step == pytest.approx(256 * 2 * 3 * 144e-9)  # one 256-token sequence per GPU
    # node-limited to 1 node: 1 x 1/2 remote copy; bf16 dispatch: 64 x 4 bytes a copy
    assert estimate_expert_parallel(cfg, est, gpu, 4, 2, node_limit=1).cross_node_bytes == 96
    assert estimate_expert_parallel(cfg, est, gpu, 4, 2, dispatch="bf16", two_hop=False).cross_node_bytes == 256
    # one node: nothing crosses, the network figure is not needed
    one = estimate_expert_parallel(cfg, est, Gpu("nv", "nv", 10, 100, 100, None, 1.0, nvlink_gbs=4), 4)
    assert one.cross_node_bytes == 0 and one.within_node_copies == 1.5  # 2 x 3/4
    with pytest.raises(ValueError, match="no network_gbs"):
        estimate_expert_parallel(cfg, est, Gpu("nv", "nv", 10, 100, 100, None, 1.0, nvlink_gbs=4), 4, 2)
    with pytest.raises(ValueError, match="cannot be split"):
        estimate_expert_parallel(cfg, est, gpu, 3)


def test_deepseek_v3_expert_parallel_can_be_hidden(catalog):
    # EP 64 over 8-GPU H800 nodes. V3's 8 expert groups sit one to a node and a token picks 4 groups:
    # node-limited to 4 nodes. 8 slots over 8 nodes would touch 5.25 nodes, so the cap binds: 4 x 7/8 = 3.5
    # copies cross InfiniBand, 3.5 x 7168 x (1 + 2) bytes = 75,264 B per token and MoE layer (1.505 us at
    # 50 GB/s); 8 x 7/8 = 7 copies over NVLink, 150,528 B (0.753 us at 200 GB/s each way).
    # 58 MoE layers + the MTP module, forward and backward: 2 x 59 x 1.505 us = 177.6 us per token.
    h800, d = catalog.gpus["h800"], DEEPSEEK_V3
    assert node_limit_of(V3, 64) == 4
    est = estimate_train(V3, d["tokens"], h800, 2048, precision="fp8")
    ep = estimate_expert_parallel(V3, est, h800, 64, node_limit=4)
    assert (ep.nodes, ep.moe_layers, ep.cross_node_copies, ep.within_node_copies) == (8, 59, 3.5, 7.0)
    assert (ep.cross_node_bytes, ep.within_node_bytes) == (75_264, 150_528)
    assert ep.comm_s_per_token == pytest.approx(2 * 59 * 75_264 / 50e9)
    # The paper (Sec. 3.2.1): cross-node EP gives "a computation-to-communication ratio of approximately 1:1",
    # which DualPipe overlaps. With the FP8 GEMMs at their dense peak (1,979 TFLOPS) the planner says 0.83:1
    # (292 GFLOP / 1,979 TFLOPS = 147 us of compute against 178 us), roughly 1:1. At the 22.7% FP8 MFU that
    # DeepSeek's published hours imply the compute takes 649 us, 3.65x the all-to-all: overlapped, it is hidden.
    assert 0.5 < ep.peak_overlap_ratio < 2
    assert ep.peak_overlap_ratio == pytest.approx(est.flops_per_token / 1979e12 / ep.comm_s_per_token)
    assert ep.overlap_ratio == pytest.approx(3.65, rel=0.01) and ep.can_hide
    # One copy per expert slot (no per-node deduplication) doubles the network bytes: 8 x 56/64 = 7 copies.
    plain = estimate_expert_parallel(V3, est, h800, 64, node_limit=4, two_hop=False)
    assert plain.cross_node_copies == 7 and plain.overlap_ratio == pytest.approx(ep.overlap_ratio / 2)


def test_cli_train_expert_parallel(tmp_path):
    base = ["train", "--model", "deepseek-v3-671b", "--tokens", "14.8T", "--hardware", "h800", "--count", "2048"]
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    plain, ep = plan(*base, env=env), plan(*base, "--expert-parallel", "64", env=env)
    assert plain.returncode == 0 == ep.returncode, ep.stderr
    assert "all-to-all" not in plain.stdout
    lines = ep.stdout.splitlines()
    assert [line for line in lines if not line.startswith(("all-to-all", "overlap", " "))] == plain.stdout.splitlines()
    assert "3.5 copies across nodes = 75.3 KB" in ep.stdout and "can hide it" in ep.stdout
    d = json.loads(plan(*base, "--expert-parallel", "64", "--json", env=env).stdout)
    assert d["expert_parallel"]["cross_node_bytes"] == 75_264 and d["expert_parallel"]["can_hide"] is True
    assert "expert_parallel" not in json.loads(plan(*base, "--json", env=env).stdout)
    bad = plan("train", "--model", "debug", "--tokens", "1B", "--hardware", "rtx4090", "--count", "4",
               "--expert-parallel", "4", env=env)
    assert bad.returncode == 2 and "no nvlink_gbs" in bad.stderr


def test_train_from_run_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"tokens_per_s": 1000.0, "mfu": 0.1, "device": "cpu",
                                                 "device_count": 1, "model": "debug"}))
    assert main(["plan", "train", "--from-run", str(run), "--tokens", "36M", "--price", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_hours"] == pytest.approx(36e6 / 1000 / 3600) == pytest.approx(10.0)
    assert out["dollars"] == pytest.approx(5.0) and out["model"] == "debug"
    # on other hardware the run's MFU carries over; the model may be an HF config dict
    (run / "report.json").write_text(json.dumps({"tokens_per_s": 1000.0, "mfu": 0.1, "device": "cpu",
                                                 "device_count": 1, "model": to_hf_config(get_preset("debug")),
                                                 "preset": "debug"}))
    assert main(["plan", "train", "--from-run", str(run), "--tokens", "1B", "--hardware", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mfu"] == 0.1 and out["hardware"] == "h100-sxm" and out["model"] == "debug"
    (run / "report.json").write_text(json.dumps({"tokens_per_s": 1000.0, "device": "cpu", "device_count": 1}))
    assert main(["plan", "train", "--from-run", str(run), "--tokens", "1B", "--model", "debug"]) == 2
    assert "missing key 'mfu'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------

def test_serve_ceilings_bound_published_measurements(catalog):
    # KTransformers V0.2, DeepSeek-V3/R1 Q4_K_M, one Xeon Gold 6454S socket (8ch DDR5-4800) + RTX 4090D:
    # 8.73 tokens/s decode. Tencent Xuanwu Lab, Q8 CPU-only, EPYC 9135 with 12ch DDR5-5600: 7.17 tokens/s.
    hybrid = estimate_serve(V3, Setup("h", catalog.gpus["rtx4090"], 1, catalog.memory["ddr5-8ch-4800"], 1),
                            "q4_k_m", context=1024)
    cpu = estimate_serve(V3, Setup("c", memory=catalog.memory["ddr5-12ch-5600"], memory_count=1),
                         "int8", context=1024)
    assert hybrid.fits and cpu.fits
    assert 8.73 < hybrid.decode_tokens_per_s < 4 * 8.73
    assert 7.17 < cpu.decode_tokens_per_s < 4 * 7.17


def test_serve_bytes_read_by_hand(catalog):
    ddr = catalog.memory["ddr5-12ch-5600"]
    est = estimate_serve(V3, Setup("c", memory=ddr, memory_count=1), "int8", context=1000)
    from gasungbi.model.accounting import count_params

    pc = count_params(V3)
    weights = pc.activated - pc.components["embedding"] + V3.hidden_size    # one embedding row
    read = weights + 1000 * (512 + 64) * 61 * 2                           # int8 weights + bf16 MLA cache
    assert est.read_gb_per_step["ddr"] * 1e9 == pytest.approx(read)
    assert est.decode_tokens_per_s == pytest.approx(537.6e9 / read)
    # batch 2: the weights once, routed experts chosen by either token, two caches
    est2 = estimate_serve(V3, Setup("c", memory=ddr, memory_count=1), "int8", context=1000, batch=2)
    routed = pc.components["routed_experts"]
    read2 = read - routed * 8 / 256 + routed * (1 - (1 - 8 / 256) ** 2) + V3.hidden_size + 1000 * 576 * 61 * 2
    assert est2.read_gb_per_step["ddr"] * 1e9 == pytest.approx(read2)
    assert est2.decode_tokens_per_s == pytest.approx(2 * 537.6e9 / read2)


def test_fits_and_does_not_fit(catalog):
    h200 = catalog.gpus["h200"]
    assert not estimate_serve(V3, Setup("x", h200, 1), "int4").fits
    assert estimate_serve(V3, Setup("x", h200, 8), "int4").fits        # 377 GB in 8 x 126.9 GB
    bf16 = estimate_serve(V3, Setup("x", h200, 8), "bf16")             # 1342 GB > 1015 GB
    assert not bf16.fits and "gpu needs" in bf16.notes[0]
    desktop = estimate_serve(V3, Setup("x", catalog.gpus["rtx4090"], 1, catalog.memory["ddr5-2ch-5600"], 1), "int4")
    assert desktop.stored_gb["gpu"] < desktop.capacity_gb["gpu"] and not desktop.fits
    assert estimate_serve(get_preset("debug"), Setup("x", catalog.gpus["rtx3090"], 1), "bf16").fits
    # a long context's KV cache alone can overflow the GPU of a hybrid set-up
    long = estimate_serve(V3, Setup("x", catalog.gpus["rtx4090"], 1, catalog.memory["ddr5-8ch-4800"], 1),
                          "int4", context=160_000, batch=4)
    assert not long.fits


def test_mla_against_mha_kv_bytes():
    assert kv_bytes_per_token(V3) == (512 + 64) * 61 * 2 == 70_272
    assert mha_kv_bytes_per_token(V3) == 128 * (192 + 128) * 61 * 2 == 4_997_120
    llama = get_preset("llama-debug")
    assert kv_bytes_per_token(llama) == mha_kv_bytes_per_token(llama)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def test_cli_train_json_and_chart(tmp_path):
    chart = tmp_path / "train.png"
    r = plan("train", "--model", "deepseek-v3-671b", "--tokens", "14.8T", "--hardware", "h800", "--count", "2048",
             "--precision", "fp8", "--json", "--chart", str(chart), env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["gpu_hours"] == pytest.approx(2.664e6, rel=0.1) and d["mfu"] == CALIBRATED_FP8_MFU
    assert chart.read_bytes().startswith(PNG)


def test_cli_serve_json_and_chart(tmp_path):
    chart = tmp_path / "serve.png"
    r = plan("serve", "--model", "deepseek-v3-671b", "--quant", "int4", "--hardware", "rtx4090 + ddr5-8ch-4800",
             "--json", "--chart", str(chart), env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["requested"]["kind"] == "hybrid" and d["requested"]["fits"]
    assert d["requested"]["placement"]["routed_experts"] == "ddr" and d["requested"]["placement"]["kv_cache"] == "gpu"
    assert {c["kind"] for c in d["comparison"]} == {"hybrid", "all-HBM", "CPU-only"}
    assert chart.read_bytes().startswith(PNG)


def test_cli_here_debug_json(tmp_path):
    r = plan("here", "--model", "debug", "--json", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["memory_bandwidth_bytes_per_s"] > 1e8 and d["matmul_flops_fp32"] > 1e8
    assert [row["quant"] for row in d["decode"]] == ["fp32", "int8", "int4"]
    assert all(row["predicted_tokens_per_s"] > 0 for row in d["decode"])


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = plan("train", "--model", "debug", "--tokens", "abc", "--hardware", "h800", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--tokens" in r.stderr and "'abc'" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "debug", "--tokens", "1B", "--hardware", "h900"], "unknown hardware 'h900'; known: h100-sxm"),
    (["serve", "--quant", "int3", "--hardware", "h100"], "unknown quantization 'int3'; known: fp32"),
    (["serve", "--hardware", "rtx4090 + ddr5-9ch"], "unknown hardware 'ddr5-9ch'"),
    (["train", "--model", "debug", "--tokens", "1B", "--hardware", "h800", "--count", "x"], "--count"),
    (["train", "--model", "debug", "--tokens", "1B", "--hardware", "h800", "--mfu", "2"], "--mfu"),
    (["train", "--model", "debug", "--tokens", "1B", "--hardware", "ddr5-8ch-4800"], "needs a GPU"),
])
def test_bad_input_messages(args, message, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_measure_functions_are_quick_and_positive():
    from gasungbi.plan.measure import measure_matmul_flops, measure_memory_bandwidth

    assert measure_matmul_flops(size=128, seconds=0.05) > 1e6
    assert measure_memory_bandwidth(size_mb=16, repeats=2) > 1e7


# ---------------------------------------------------------------------------------------------
# backtest, any model, any machine
# ---------------------------------------------------------------------------------------------

def test_published_table_loads_and_every_row_is_cited():
    from gasungbi.plan.backtest import CALIBRATION_KINDS, load_published

    rows = load_published()
    assert len(rows) >= 12
    assert {r["calibrates"] for r in rows if r.get("calibrates")} == set(CALIBRATION_KINDS)
    for r in rows:
        assert len(r["source"]) > 20, r["name"]
        if "hf" in r["model"] or "counts" in r["model"]:
            assert r["model"].get("source"), f"{r['name']}: model shape has no source"
    names = " ".join(r["name"] for r in rows)
    for want in ("DeepSeek-V3", "DeepSeek-V2", "67B", "405B", "70B", "8B", "Llama 2 7B", "nanochat", "modded-nanogpt",
                 "KTransformers", "llama.cpp", "EPYC", "DeepSeek online service"):
        assert want in names


def test_backtest_reproduces_calibration_and_states_its_record(catalog):
    from gasungbi.plan.backtest import run_backtest

    bt = run_backtest(catalog)
    for r in bt.rows:
        if r.calibrates:
            assert r.error == pytest.approx(0, abs=1e-9)
    assert bt.constants["train_moe"] == pytest.approx(CALIBRATED_MFU, abs=0.003)  # BF16: 22.8% of FP8 / 1.43 x 2
    predicted = bt.predicted_rows
    assert len(predicted) == len(bt.rows) - 3
    # The record as it stands (deterministic: shapes, figures, formulas). Issue 18's goal is a
    # median of 25% or less and no row beyond 2x. With Llama 3.1's long-context stages counted,
    # DeepSeek's data-parallel attention read per GPU and FP8 counted at torchao's 1.43x over BF16
    # (DeepSeek-V2, BF16, +32% -> -5%), the median was 18.3%; with Llama 2's three sizes (+10% to
    # +21%) it is 16.9%. Llama 3.1 8B is 2.04x (Meta's hours imply 19% MFU against 38% for the
    # 405B, a gap already in Llama 3 8B's 8K-only hours). These bounds keep the record from
    # getting worse.
    assert bt.median_abs_error == pytest.approx(0.169, abs=0.005)
    assert bt.constants["train_dense"] == pytest.approx(0.382, abs=0.002)  # Llama 3 paper Table 4: 38-43%
    assert bt.worst.name == "Llama 3.1 8B" and bt.worst.ratio <= 2.05
    assert sum(r.ratio > 2 for r in predicted) <= 1
    service = next(r for r in predicted if r.name.startswith("DeepSeek online service"))
    assert service.error <= 0.45  # +96% before each GPU read its own copy of MLA and the shared expert
    for r in predicted:  # every row off by more than 25% says what the planner misses
        assert abs(r.error) <= 0.25 or r.misses, r.name
    # the 8B's note rules out its shape with Llama 2's implied MFUs: the figures it quotes are the rows'
    llama2 = {r.name: r for r in predicted if r.name.startswith("Llama 2")}
    assert len(llama2) == 3 and all(abs(r.error) <= 0.25 for r in llama2.values())
    for name in ("Llama 2 7B", "Llama 2 13B"):
        assert f"{name}" in bt.worst.misses and f"{llama2[name].efficiency:.1%}" in bt.worst.misses


def test_backtest_data_parallel_parts_are_read_by_every_gpu(catalog):
    from gasungbi.plan.backtest import decode_ceiling, load_published

    row = next(r for r in load_published() if r.get("data_parallel"))
    split = {k: v for k, v in row.items() if k != "data_parallel"}
    n, gpu = 144, catalog.lookup("h800")
    est = estimate_serve(get_preset("deepseek-v3-671b"), Setup("s", gpu, n), "fp8", row["context"], row["batch"])
    copy = sum(est.parts_gb[p] for p in row["data_parallel"]) * 1e9

    def step(r: dict) -> float:  # seconds per decode step of the whole unit
        return row["batch"] / (decode_ceiling(r, catalog) * row["per_unit"])

    # memory-bound at this batch: the step grows by the N - 1 extra copies over the N GPUs' bandwidth
    assert step(row) - step(split) == pytest.approx((n - 1) * copy / (n * gpu.bandwidth_gbs * 1e9), rel=1e-6)
    assert 13e9 < copy < 15e9  # MLA 11.4B + shared experts 2.6B + router and norms, at 1 byte (FP8)


def test_cli_backtest_prints_table_and_summary(tmp_path):
    r = plan("backtest", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[calibrates]" in out and "median |error|" in out and "worst" in out
    assert "rows not used for calibration" in out and "what the planner does not model" in out
    d = json.loads(plan("backtest", "--json", env={"XDG_CONFIG_HOME": str(tmp_path)}).stdout)
    assert len(d["calibration_rows"]) == 3 and d["median_abs_error"] > 0


def test_backtest_here_row_from_a_run(tmp_path, catalog):
    from gasungbi.plan.backtest import run_backtest

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"tokens_per_s": 500.0, "mfu": 0.05, "device": "cpu",
                                                 "device_count": 1, "preset": "debug",
                                                 "peak_flops_per_device": 1e11, "flops_per_token": 1e7}))
    bt = run_backtest(catalog, run)
    here = bt.rows[-1]
    assert here.name.startswith("this machine") and here.published == 500.0
    assert here.predicted == pytest.approx(bt.constants["train_dense"] * 1e11 / 1e7)


def _decode_report(path, **changes):
    import platform

    data = {"kind": "gasungbi decode", "checkpoint": "/ckpts/tiny", "config": to_hf_config(get_preset("debug")),
            "weights": "int8", "device": "cpu", "threads": 2, "compile": True, "speculative": False,
            "batch_size": 1, "prompt_tokens": 32, "new_tokens": 64, "decode_tokens_per_s": 300.0,
            "machine": {"host": platform.node(), "cpu": "x"}, **changes}
    path.write_text(json.dumps(data))
    return path


def test_backtest_decode_row_from_a_report(tmp_path, catalog, monkeypatch):
    """``--decode REPORT``: our engine's measured decode beside the decode constant x ``plan here``'s
    ceiling (local_decode at this machine's measured bandwidth and FLOP/s, at the mean context)."""
    from gasungbi.plan import measure
    from gasungbi.plan.backtest import run_backtest

    monkeypatch.setattr(measure, "measure_memory_bandwidth", lambda: 20e9)  # this machine, fixed for the check
    monkeypatch.setattr(measure, "measure_matmul_flops", lambda: 50e9)
    bt = run_backtest(catalog, decode=_decode_report(tmp_path / "r.json"))
    row, ceiling = bt.rows[-1], local_decode(get_preset("debug"), 20e9, 50e9, "int8", 32 + 32)
    assert row.name == "this machine: tiny decode (int8, compiled, 2 threads)" and row.published == 300.0
    assert row.predicted == pytest.approx(bt.constants["decode"] * ceiling["predicted_tokens_per_s"])
    assert row.efficiency == pytest.approx(300.0 / ceiling["predicted_tokens_per_s"]) and row in bt.predicted_rows


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 4}, "batch 4"), ({"speculative": True}, "speculative"), ({"device": "cuda:0"}, "cuda:0"),
    ({"machine": {"host": "elsewhere"}}, "'elsewhere'"), ({"weights": "int3"}, "int3"),
    ({"config": {"model_type": "gpt2"}}, "gpt2"), ({"decode_tokens_per_s": 0}, "no decode tokens"),
    ({"kind": "training"}, "not a decode report")])
def test_backtest_decode_report_errors_name_the_problem(tmp_path, changes, message, capsys):
    assert main(["plan", "backtest", "--decode", str(_decode_report(tmp_path / "r.json", **changes))]) == 2
    err = capsys.readouterr().err
    assert message in err and "r.json" in err and err.strip().count("\n") == 0, err
    (tmp_path / "bad.json").write_text("{")
    assert main(["plan", "backtest", "--decode", str(tmp_path / "bad.json")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_plan_imports_no_torch():
    code = ("import gasungbi.plan.counts, gasungbi.plan.training, gasungbi.plan.all_to_all, gasungbi.plan.runs, "
            "gasungbi.plan.serving, gasungbi.plan.local, gasungbi.plan.backtest, gasungbi.plan.models, "
            "gasungbi.plan.catalog, gasungbi.plan.commands, sys; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = plan("backtest")
    assert r.returncode == 0, r.stderr


def test_params_active_and_custom_hardware(tmp_path, capsys):
    from gasungbi.plan.counts import flops_per_token

    m = CountModel(params=70e9, active=70e9)
    assert flops_per_token(m, 4096) == 6 * 70e9
    # with attention: 12 x layers x width x span (nanochat's d24 count)
    d24 = CountModel(729.8e6, 729.8e6, layers=24, attention_width=1536, attention_context=1280)
    assert flops_per_token(d24, 2048) == pytest.approx(4.3308e19 / (16704 * 524288), rel=1e-3)
    assert main(["plan", "train", "--params", "70B", "--tokens", "1T", "--peak-tflops", "500", "--bandwidth", "2000",
                 "--count", "100", "--mfu", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_hours"] == pytest.approx(6 * 70e9 * 1e12 / (0.5 * 500e12) / 3600)
    assert out["hardware"] == "custom" and out["total_params"] == 70e9
    # MoE counts: decode at batch 1 reads the active weights only
    assert main(["plan", "serve", "--params", "100B", "--active", "10B", "--quant", "int8", "--peak-tflops", "100",
                 "--bandwidth", "1000", "--memory", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requested"]["decode_tokens_per_s"] == pytest.approx(1000e9 / 10e9)
    assert out["requested"]["fits"] and out["requested"]["stored_gb"]["gpu"] == pytest.approx(100)
    assert main(["plan", "serve", "--params", "100B", "--peak-tflops", "100"]) == 2
    assert "--bandwidth" in capsys.readouterr().err


def test_model_from_a_config_json(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "vocab_size": 128256, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    assert main(["plan", "model", "--model", str(tmp_path)]) == 0
    assert "GQA, 32 layers" in capsys.readouterr().out
    assert main(["plan", "train", "--model", str(cfg), "--tokens", "15T", "--hardware", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == pytest.approx(8.03e9, rel=0.01)


def test_cli_serve_deepseek_v4_kv_at_128k_and_1m_beside_v3_mla(tmp_path):
    """DeepSeek-V4's cache does not grow by a fixed width per token: plan prints it amortized at 128K and
    1M positions (what the engine's cache allocates, per position), beside V3's MLA latent."""
    from gasungbi.infer.cache import KVCache
    from gasungbi.presets import get_preset

    r = plan("serve", "--model", "deepseek-v4-flash", "--quant", "int4", "--hardware", "8x h200",
             "--context", "1048576", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    flash = get_preset("deepseek-v4-flash")
    at = [KVCache.bytes_per_token(flash, context=c) / 1e3 for c in (2 ** 17, 2 ** 20)]
    assert (f"KV cache in bf16: {at[0]:,.2f} KB/token at 128K context, {at[1]:,.2f} KB/token at 1M" in r.stdout
            and "DeepSeek-V3's MLA latent: 70.3 KB/token" in r.stdout)
    d = json.loads(plan("serve", "--model", "deepseek-v4-flash", "--hardware", "8x h200", "--context", "131072",
                        "--json", env={"XDG_CONFIG_HOME": str(tmp_path)}).stdout)
    assert d["kv_bytes_per_token"] == pytest.approx(at[0] * 1e3)
    assert d["requested"]["parts_gb"]["kv_cache"] == pytest.approx(at[0] * 1e3 * 2 ** 17 / 1e9)
