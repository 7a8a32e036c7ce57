"""``gasungbi plan``: hardware and cost planning for training and serving.

    gasungbi plan train --model deepseek-v3-671b --tokens 14.8T --hardware h800 --count 2048
    gasungbi plan train --from-run runs/tiny --tokens 2B
    gasungbi plan serve --model deepseek-v3-671b --quant int4 --hardware "rtx4090 + ddr5-8ch-4800"
    gasungbi plan here --model cpu-tiny
    gasungbi plan model --model deepseek-v3-671b
    gasungbi plan train --params 70B --tokens 2T --peak-tflops 400 --bandwidth 2000 --count 64
    gasungbi plan backtest                       # the planner against published runs

Every subcommand takes ``--json`` and ``--catalog FILE`` (extra hardware entries). The arithmetic is
in the modules named by their question (``counts``, ``training``, ``all_to_all``, ``serving``,
``local``); this module parses, prints and draws. Importing it is cheap.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from tyro.conf import UseAppendAction

from gasungbi.errors import UserError
from gasungbi.plan import options as opt


Catalogs = Annotated[tuple[str, ...], UseAppendAction]


def _run(body, values: dict[str, Any]) -> int:
    """Call a subcommand's body with its flags as attributes; planner errors become one-line UserErrors."""
    from gasungbi.plan.catalog import CatalogError

    try:
        return body(SimpleNamespace(**values))
    except (CatalogError, ValueError) as e:
        raise UserError(str(e)) from None


def train(tokens: str, model: str | None = None, params: str | None = None, active: str | None = None,
          hardware: str | None = None, peak_tflops: float | None = None, bandwidth: float | None = None,
          memory: float | None = None, count: int | None = None, mfu: float | None = None, price: float | None = None,
          seq_len: int = 4096, from_run: str | None = None, chart: str | None = None, catalog: Catalogs = (),
          json: bool = False, precision: Literal["bf16", "fp8"] = "bf16", expert_parallel: int | None = None,
          gpus_per_node: int = 8, dispatch: Literal["fp8", "bf16"] = "fp8") -> int:
    """GPU-hours, days and dollars of a training run. Without --mfu, the MFU is the one DeepSeek-V3's
    published H800-hours imply against the FP8 peak (--precision fp8, as DeepSeek-V3 trained), or for
    BF16 that run 1.43x slower (torchao's published FP8 speed-ups over BF16 are 1.34-1.51x).

    Args:
        tokens: training tokens, e.g. 14.8T, 500B, 2M
        model: a preset name, a Hugging Face config.json or its directory
        params: instead of --model: total parameters, e.g. 70B
        active: with --params: parameters one token uses (default: all, a dense model)
        hardware: a GPU from the catalog, e.g. h800
        peak_tflops: instead of --hardware: dense peak TFLOPS of an unlisted accelerator
        bandwidth: with --peak-tflops: its memory bandwidth in GB/s
        memory: with --peak-tflops: its memory in GB (default: unlimited, fit not checked)
        count: number of GPUs (default 1, or the run's)
        mfu: model FLOPs utilization against the dense peak of --precision, 0-1
        price: USD per GPU-hour (default: the catalog's)
        seq_len: training sequence length
        from_run: use the throughput and MFU measured in one of our runs (a run directory)
        chart: write a dollars-against-tokens chart to this PNG
        catalog: extra hardware catalog JSON (repeatable; ~/.config/gasungbi/hardware.json is read too)
        json: print JSON instead of a table
        precision: the GEMMs' precision: bf16, or fp8 (DeepSeek-V3's FP8 training; MFU against the FP8 peak)
        expert_parallel: K: also the all-to-all of experts sharded over K GPUs and whether compute hides it
        gpus_per_node: with --expert-parallel: GPUs per node (NVLink within, the network across)
        dispatch: with --expert-parallel: precision of the dispatch (DeepSeek: fp8); the combine is bf16
    """
    return _run(_train, locals())


def serve(model: str = "deepseek-v3-671b", params: str | None = None, active: str | None = None,
          hardware: str | None = None, peak_tflops: float | None = None, bandwidth: float | None = None,
          memory: float | None = None, count: int | None = None, quant: str = "int4", context: int = 4096,
          batch: int = 1, ddr_gb: float | None = None, chart: str | None = None, catalog: Catalogs = (),
          json: bool = False) -> int:
    """Placement, fit, decode and prefill ceilings and cost of serving a model, with an all-HBM /
    hybrid GPU+DDR / CPU-only comparison.

    Args:
        model: a preset name, a Hugging Face config.json or its directory
        params: instead of --model: total parameters, e.g. 70B
        active: with --params: parameters one token uses (default: all, a dense model)
        hardware: e.g. 'rtx4090 + ddr5-8ch-4800', '8x h200', 'ddr5-12ch-5600'
        peak_tflops: instead of --hardware: dense peak TFLOPS of an unlisted accelerator
        bandwidth: with --peak-tflops: its memory bandwidth in GB/s
        memory: with --peak-tflops: its memory in GB (default: unlimited, fit not checked)
        count: with --peak-tflops/--bandwidth: number of such devices (default 1)
        quant: weight format: fp32, bf16, fp8, int8, q8_0, int4, q4_k_m
        context: context tokens held in the KV cache per sequence
        batch: sequences decoded together
        ddr_gb: DRAM per CPU platform in GB (default: the catalog's)
        chart: write a tokens/s by set-up and quantization chart to this PNG
        catalog: extra hardware catalog JSON
        json: print JSON instead of a table
    """
    return _run(_serve, locals())


def here(model: str = "cpu-tiny", context: int = 512, catalog: Catalogs = (), json: bool = False) -> int:
    """Measure this machine's memory bandwidth and fp32 matmul FLOP/s (a few seconds) and predict our
    engine's decode tokens/s at fp32, int8 and int4 weights.

    Args:
        model: a preset name, a Hugging Face config.json or its directory
        context: context tokens
        catalog: extra hardware catalog JSON
        json: print JSON instead of a table
    """
    return _run(_here, locals())


def model(model: str = "deepseek-v3-671b", seq_len: int = 4096, catalog: Catalogs = (), json: bool = False) -> int:
    """Model accounting: parameters per component, weight bytes per format, KV cache bytes per token
    against an MHA model of the same shape, FLOPs per token.

    Args:
        model: a preset name, a Hugging Face config.json or its directory
        seq_len: sequence length for the attention FLOPs
        catalog: extra hardware catalog JSON
        json: print JSON instead of a table
    """
    return _run(_model_cmd, locals())


def backtest(run: str | None = None, decode: str | None = None, sources: bool = False, catalog: Catalogs = (),
             json: bool = False) -> int:
    """The planner against published training runs and decode speeds: each measurement in
    gasungbi/plan/published.json (one cited source per row) predicted, with its error and implied
    efficiency; the median and worst error are over the rows not used for calibration.

    Args:
        run: add this machine: one of our training runs (its report.json)
        decode: add this machine: our engine's batch-1 decode, a report written here by gasungbi generate --report FILE
        sources: print each row's source
        catalog: extra hardware catalog JSON
        json: print JSON instead of a table
    """
    return _run(_backtest, locals())


PLAN = {"train": train, "serve": serve, "here": here, "model": model, "backtest": backtest}


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for suffix, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:,.3g}{suffix}{unit}"
    return f"{x:,.3g}{unit}"


def _emit(args: SimpleNamespace, data: dict[str, Any], lines: list[str]) -> int:
    print(json.dumps(data, indent=2) if args.json else "\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------
# plan train
# ---------------------------------------------------------------------------------------------

def _mfu_text(est, gpu) -> str:
    if est.mfu is None:
        return "n/a"
    if est.peak_bf16_tflops is None:  # measured throughput: the MFU is whatever the run reported
        return f"{est.mfu:.1%} (as the run reported it)"
    if est.precision == "fp8":
        return (f"{est.mfu:.1%} of the dense FP8 peak ({gpu.fp8_tflops:g} TFLOPS; "
                f"{est.mfu * gpu.fp8_tflops / est.peak_bf16_tflops:.1%} of the BF16 peak equivalent)")
    fp8 = f" ({est.mfu * est.peak_bf16_tflops / gpu.fp8_tflops:.1%} of the FP8 peak)" if gpu.fp8_tflops else ""
    return f"{est.mfu:.1%} of the dense BF16 peak{fp8}"


def _train(args: SimpleNamespace) -> int:
    from gasungbi.plan.counts import is_moe
    from gasungbi.plan.runs import read_run

    catalog = opt.catalog(args)
    tokens = opt.tokens(args.tokens)
    seq_len = opt.check(args.seq_len, "--seq-len", lo=1)
    mfu = opt.check(args.mfu, "--mfu", lo=1e-6, hi=1.0)
    price = opt.check(args.price, "--price", lo=0.0)
    run = read_run(args.from_run) if args.from_run else None
    cfg, model_name = _train_model(args, run)
    custom = opt.accelerator(args)
    gpu = _train_gpu(args, catalog, run, custom)
    count = opt.check(args.count, "--count", lo=1, default=run.device_count if run else 1)
    own_model = args.model is None and not opt.gives_counts(args)
    if run and own_model and args.hardware is None and custom is None and mfu is None:
        # The run's own model on the run's own devices: its measured throughput carries over.
        est = _train_at_throughput(run, cfg, tokens, gpu, count, price, seq_len)
    else:
        est = _train_at_mfu(args, catalog, run, cfg, tokens, gpu, count, mfu, price, seq_len)

    data, lines = _train_table(cfg, model_name, est, gpu)
    default_mfu, dense = args.mfu is None and run is None, not is_moe(cfg)
    if default_mfu:
        data["calibration"] = _calibration_data(dense)
    if args.expert_parallel is not None:  # beside the GPU-hours, before the calibration note
        data["expert_parallel"], more = _expert_parallel(args, cfg, est, gpu, count)
        lines += more
    if default_mfu:
        lines.append(_calibration_line(dense))
    if args.chart:
        _train_chart(args.chart, est, catalog)
        lines.append(f"chart        {args.chart}")
        data["chart"] = args.chart
    return _emit(args, data, lines)


def _train_model(args: SimpleNamespace, run) -> tuple[Any, str]:
    """The model to train and its display name: ``--model``, the counts, or the run's own model."""
    counts = opt.gives_counts(args)
    if args.model is None and run is None and not counts:
        raise UserError("give --model, --params N [--active N] or --from-run DIR")
    cfg = opt.model(args.model if args.model is not None or counts else run.model, args)
    model_name = args.model or (f"{args.params} parameters ({args.active or args.params} active)" if counts
                                else run.name)
    return cfg, model_name


def _train_gpu(args: SimpleNamespace, catalog, run, custom):
    """The GPU to train on: the unlisted accelerator, ``--hardware``, or the run's device when the
    catalog knows it (else None)."""
    from gasungbi.plan.catalog import Gpu

    gpu = custom or (catalog.lookup(args.hardware) if args.hardware
                     else (catalog.match_device(run.device) if run else None))
    if args.hardware and not isinstance(gpu, Gpu):
        raise UserError(f"--hardware {args.hardware!r} is a memory platform; plan train needs a GPU: "
                        f"{', '.join(catalog.gpus)}")
    return gpu


def _train_at_throughput(run, cfg, tokens: float, gpu, count: int, price: float | None, seq_len: int):
    """The estimate at the run's measured tokens/s, scaled to ``count`` devices."""
    from gasungbi.plan.training import estimate_train_from_throughput

    price = price if price is not None else (gpu.price_per_hour if gpu else None)
    est = estimate_train_from_throughput(cfg, tokens, run.tokens_per_s, run.device_count, count,
                                         gpu.key if gpu else run.device, run.mfu, price, seq_len)
    est.basis = f"measured {run.tokens_per_s:,.1f} tokens/s on {run.device_count}x {run.device} ({run.path})"
    return est


def _train_at_mfu(args: SimpleNamespace, catalog, run, cfg, tokens: float, gpu, count: int, mfu: float | None,
                  price: float | None, seq_len: int):
    """The estimate at ``--mfu``, else the run's measured MFU, else the calibrated default."""
    from gasungbi.plan.training import estimate_train

    if gpu is None:
        hint = f"the run's device {run.device!r} is not in the catalog; " if run else ""
        raise UserError(f"{hint}pass --hardware (one of: {', '.join(catalog.gpus)})")
    if run and mfu is None:
        if run.mfu <= 0:
            raise UserError(f"{run.path}: mfu is {run.mfu}; pass --mfu")
        mfu = run.mfu
    try:
        est = estimate_train(cfg, tokens, gpu, count, mfu, price, seq_len, precision=args.precision)
    except ValueError as e:
        raise UserError(f"--precision {args.precision}: {e}") from None
    if run and args.mfu is None:
        est.basis = f"MFU measured in {run.path}"
    return est


def _train_table(cfg, model_name: str, est, gpu) -> tuple[dict[str, Any], list[str]]:
    """The estimate as JSON and as the lines of the table, model to cost."""
    from gasungbi.model.accounting import count_params
    from gasungbi.plan.counts import CountModel

    if isinstance(cfg, CountModel):
        total, activated = cfg.params, cfg.active
    else:
        pc = count_params(cfg)
        total, activated = pc.total, pc.activated
    data = {"model": model_name, "total_params": total, "activated_params": activated, **est.to_dict()}
    lines = [
        f"model        {model_name}: {_si(total)} total, {_si(activated)} activated parameters",
        f"hardware     {est.count:,}x {est.hardware}" + (f" ({est.peak_bf16_tflops:g} dense BF16 TFLOPS each)"
                                                       if est.peak_bf16_tflops else ""),
        f"tokens       {_si(est.tokens)} at sequence length {est.seq_len}",
        f"FLOPs        {_si(est.flops_per_token)} per token (6 x activated + attention, MTP included)"
        f" = {est.total_flops:.3g} in all",
        f"MFU          {_mfu_text(est, gpu)}  [{est.basis}]",
        f"GPU-hours    {est.gpu_hours / 1e6:,.4g}M" if est.gpu_hours >= 1e5 else f"GPU-hours    {est.gpu_hours:,.1f}",
        "wall clock   " + (f"{est.days:,.1f} days" if est.days >= 1 else f"{est.days * 24:,.2f} hours")
        + f" on {est.count:,} GPU{'s' if est.count != 1 else ''}",
        "cost         " + (f"${est.dollars:,.{0 if est.dollars >= 100 else 2}f} at ${est.price_per_hour:g}/GPU-hour"
                           if est.dollars is not None else "n/a (no price for this device: pass --price)"),
    ]
    return data, lines


def _calibration_data(dense: bool) -> dict[str, Any]:
    """The published figures and constants behind the default MFU, for ``--json``."""
    from gasungbi.plan.training import (CALIBRATED_DENSE_MFU, CALIBRATED_FP8_MFU, CALIBRATED_MFU, DEEPSEEK_V3,
                                        FP8_TRAINING_SPEEDUP)

    return {"deepseek_v3": DEEPSEEK_V3, "calibrated_mfu": CALIBRATED_MFU, "calibrated_fp8_mfu": CALIBRATED_FP8_MFU,
            "calibrated_dense_mfu": CALIBRATED_DENSE_MFU, "dense": dense, "fp8_training_speedup": FP8_TRAINING_SPEEDUP}


def _calibration_line(dense: bool) -> str:
    """Where the default MFU comes from: Llama 3.1 405B for a dense model, DeepSeek-V3 for an MoE."""
    from gasungbi.plan.training import (CALIBRATED_DENSE_MFU, CALIBRATED_FP8_MFU, CALIBRATED_MFU, DEEPSEEK_V3,
                                        FP8_TRAINING_SPEEDUP)

    if dense:
        return (f"calibration  dense: Meta's Llama 3.1 405B card reports 30.84M H100-hours for 15.6T tokens, "
                f"{CALIBRATED_DENSE_MFU:.1%} of the BF16 peak under this FLOP count (the Llama 3 paper: "
                f"38-43%); `gasungbi plan backtest` checks it against other published dense runs. A mixture "
                f"of experts gets DeepSeek-V3's {CALIBRATED_MFU:.1%}.")
    d = DEEPSEEK_V3
    return (f"calibration  DeepSeek-V3 reports {d['pretrain_gpu_hours'] / 1e6:.3f}M H800-hours for "
            f"pre-training on 14.8T tokens (${d['pretrain_usd'] / 1e6:.3f}M at $2/h); "
            f"{d['total_gpu_hours'] / 1e6:.3f}M (${d['total_usd'] / 1e6:.3f}M) with context extension "
            f"and post-training; that is an implied MFU of {CALIBRATED_FP8_MFU:.1%} of the H800's "
            f"dense FP8 peak (DeepSeek-V3 ran its GEMMs in FP8). A BF16 run is taken as "
            f"{FP8_TRAINING_SPEEDUP:g}x slower (torchao's published FP8 speed-ups, 1.34-1.51x): "
            f"{CALIBRATED_MFU:.1%} of the BF16 peak.")


def _train_chart(path: str, est, catalog) -> None:
    """Dollars against tokens for the estimate's GPU and, at the same MFU, every other catalog GPU."""
    from gasungbi.plan.charts import train_chart

    if est.dollars is None:
        raise UserError("--chart needs a price: pass --price")
    curves = {est.hardware: est.dollars / est.tokens}
    if est.mfu:
        for g in catalog.gpus.values():
            if g.key != est.hardware:
                curves[g.key] = est.flops_per_token / (est.mfu * g.bf16_tflops * 1e12) / 3600 * g.price_per_hour
    train_chart(path, curves, (est.hardware, est.tokens, est.dollars))


def _expert_parallel(args: SimpleNamespace, cfg, est, gpu, count: int) -> tuple[dict[str, Any], list[str]]:
    """``--expert-parallel K``: the all-to-all estimate as JSON and as lines of the table."""
    from gasungbi.plan.all_to_all import estimate_expert_parallel, node_limit_of
    from gasungbi.plan.counts import CountModel

    K = opt.check(args.expert_parallel, "--expert-parallel", lo=1)
    G = opt.check(args.gpus_per_node, "--gpus-per-node", lo=1)
    if K > count:
        raise UserError(f"--expert-parallel {K} needs at least {K} GPUs; --count is {count}")
    if gpu is None or isinstance(cfg, CountModel):
        raise UserError("--expert-parallel needs --model (an MoE architecture) and --hardware (a GPU)")
    ep = estimate_expert_parallel(cfg, est, gpu, K, G, node_limit_of(cfg, K, G), dispatch=args.dispatch)
    limit = f", node-limited routing: at most {ep.node_limit} nodes per token" if ep.node_limit else ""
    links = ", ".join(x for x in (f"network {ep.network_gbs:g} GB/s" if ep.nodes > 1 else "",
                                   f"NVLink {ep.nvlink_gbs_each_way:g} GB/s" if ep.within_node_bytes else "") if x)
    us = lambda s: f"{s * 1e6:,.3g} us"  # noqa: E731
    peak = "FP8" if est.precision == "fp8" else "BF16"
    lines = [
        f"all-to-all   EP {K} over {ep.nodes} node{'s' if ep.nodes > 1 else ''} of {min(K, G)} GPUs"
        f" ({gpu.key}: {links or 'no links needed'} per GPU each way){limit}",
        f"             per token and MoE layer, dispatch {ep.dispatch} + combine {ep.combine}: "
        f"{ep.cross_node_copies:.3g} copies across nodes = {ep.cross_node_bytes / 1e3:,.1f} KB, "
        f"{ep.within_node_copies:.3g} within a node = {ep.within_node_bytes / 1e3:,.1f} KB",
        f"             {ep.moe_layers} MoE layers, forward and backward: {us(ep.comm_s_per_token)} of all-to-all per "
        f"token against {us(ep.compute_s_per_token)} of compute; per {ep.tokens_per_gpu:,} tokens on a GPU: "
        f"{ep.comm_s_per_step:,.3g} s against {ep.compute_s_per_step:,.3g} s",
    ]
    if ep.comm_s_per_token:
        verdict = ("the computation can hide it when the two overlap (DeepSeek's DualPipe)" if ep.can_hide
                   else "the computation cannot hide it: the all-to-all is the bottleneck")
        lines.append(f"overlap      computation : communication = {ep.overlap_ratio:.2f} : 1 "
                     f"({ep.peak_overlap_ratio:.2f} : 1 at the dense {peak} peak); {verdict}; without overlap it "
                     f"adds {ep.comm_s_per_token / ep.compute_s_per_token:.0%} to the GPU-hours")
    data = ep.to_dict()
    for key in ("overlap_ratio", "peak_overlap_ratio"):  # JSON has no infinity
        data[key] = None if data[key] == float("inf") else data[key]
    return data, lines


# ---------------------------------------------------------------------------------------------
# plan serve
# ---------------------------------------------------------------------------------------------

def _serve(args: SimpleNamespace) -> int:
    from gasungbi.plan.counts import quant_bits
    from gasungbi.plan.serving import DEFAULT_GPU, DEFAULT_MEMORY, compare_setups

    catalog = opt.catalog(args)
    counts = opt.gives_counts(args)
    cfg = opt.model(None if counts else args.model, args)
    model_name = f"{args.params} parameters ({args.active or args.params} active)" if counts else args.model
    quant_bits(args.quant)
    quant = args.quant.lower()
    context = opt.check(args.context, "--context", lo=0)
    batch = opt.check(args.batch, "--batch", lo=1)
    ddr_gb = opt.check(args.ddr_gb, "--ddr-gb", lo=1.0)
    hw = _serve_hardware(args, catalog)
    defaults = dict(default_gpu=catalog.lookup(DEFAULT_GPU), default_memory=catalog.lookup(DEFAULT_MEMORY))
    results = compare_setups(cfg, hw, quant, context, batch, ddr_gb, **defaults)
    req = results[0]
    kv, mha, kv_line = _kv_line(None if counts else cfg, context)
    lines = [f"{model_name} at {quant} ({req.bits_per_weight:g} bits/weight), context {context:,}, batch {batch}"
             + (" (MTP modules not served)" if not counts and cfg.num_nextn_predict_layers else ""),
             kv_line, ""]
    lines += _requested_lines(req, hw)
    lines += _comparison_lines(results, quant, context, batch)
    data = {"model": model_name, "kv_bytes_per_token": kv, "mha_kv_bytes_per_token": mha,
            "requested": req.to_dict(), "comparison": [r.to_dict() for r in results]}
    if args.chart:
        _serve_chart(args.chart, cfg, hw, model_name, context, batch, ddr_gb, defaults)
        lines.append(f"\nchart: {args.chart}")
        data["chart"] = args.chart
    return _emit(args, data, lines)


def _serve_hardware(args: SimpleNamespace, catalog):
    """The set-up to serve on: the unlisted accelerator (``--count`` of them) or ``--hardware``."""
    from gasungbi.plan.catalog import Hardware, parse_hardware

    custom = opt.accelerator(args)
    if custom is not None:
        return Hardware(gpu=custom, gpu_count=opt.check(args.count, "--count", lo=1, default=1))
    if args.hardware:
        if args.count is not None:
            raise UserError("--count goes with --peak-tflops/--bandwidth; in --hardware write '8x h200'")
        return parse_hardware(args.hardware, catalog)
    raise UserError("give --hardware (a catalog name) or --peak-tflops X --bandwidth Y")


def _kv_line(cfg, context: int = 0) -> tuple[float, int, str]:
    """KV cache bytes per token of ``cfg`` (DeepSeek-V4's at ``context``) and of an MHA model of its
    shape, and the line that compares them; zeros when the model is known by its counts alone (``cfg``
    None). DeepSeek-V4's, which depend on the context, are given at 128K and 1M beside V3's MLA latent."""
    from gasungbi.plan.counts import kv_bytes_per_token, mha_kv_bytes_per_token

    if cfg is None:
        return 0, 0, "KV cache not counted (--params/--active give no attention shape; pass --model for it)"
    if cfg.is_v4:
        from gasungbi.presets import deepseek_v3_671b

        at = [kv_bytes_per_token(cfg, context=c) for c in (2 ** 17, 2 ** 20)]
        mla = kv_bytes_per_token(deepseek_v3_671b())
        return kv_bytes_per_token(cfg, context=context or None), mha_kv_bytes_per_token(cfg), (
            f"KV cache in bf16: {at[0] / 1e3:,.2f} KB/token at 128K context, {at[1] / 1e3:,.2f} KB/token at 1M "
            f"(a {cfg.sliding_window}-token window, one entry per {cfg.compress_rate_csa} (CSA) or "
            f"{cfg.compress_rate_hca} (HCA) tokens, amortized); DeepSeek-V3's MLA latent: {mla / 1e3:,.1f} KB/token "
            f"({mla / at[0]:.1f}x / {mla / at[1]:.1f}x)")
    kv, mha = kv_bytes_per_token(cfg), mha_kv_bytes_per_token(cfg)
    return kv, mha, (f"KV cache {kv / 1e3:,.1f} KB/token in bf16 ({'MLA latent' if cfg.is_mla else 'GQA'}; an MHA "
                     f"model of this shape: {mha / 1e6:,.2f} MB/token, {mha / kv:.1f}x)")


def _requested_lines(req, hw) -> list[str]:
    """The requested set-up: where each part lives, the fit and reads per memory, ceilings, cost."""
    lines = [f"requested: {req.setup}  [{req.kind}]",
             f"  {'part':<18}{'where':<7}{'GB':>10}"]
    for part, gb in req.parts_gb.items():
        lines.append(f"  {part:<18}{req.placement[part]:<7}{gb:>10,.2f}")
    bw = {"gpu": hw.gpu.bandwidth_gbs * hw.gpu_count if hw.gpu else 0,
          "ddr": hw.memory.bandwidth_gbs * hw.memory_count if hw.memory else 0}
    for mem in req.stored_gb:
        ok = req.stored_gb[mem] <= req.capacity_gb[mem]
        lines.append(f"  {mem.upper()}: {req.stored_gb[mem]:,.1f} GB of {req.capacity_gb[mem]:,.1f} GB usable -> "
                     f"{'fits' if ok else 'DOES NOT FIT'}; reads {req.read_gb_per_step[mem]:,.2f} GB per step "
                     f"at {bw[mem]:,.0f} GB/s")
    lines += [f"  decode ceiling   {req.decode_tokens_per_s:,.1f} tokens/s (sum over memories of bytes read / bandwidth)",
              "  prefill ceiling  " + (f"{req.prefill_tokens_per_s:,.0f} tokens/s (FLOPs / dense peak)"
                                        if req.prefill_tokens_per_s else "n/a (no FLOPS figure for the CPU)"),
              f"  cost             ${req.cost_per_hour:,.3f}/hour -> ${req.usd_per_million_tokens:,.2f} per 1M output "
              "tokens at the ceiling (GPUs rented; DDR platforms bought, 3 years 24/7, no power)"]
    return lines + [f"  note: {n}" for n in req.notes]


def _comparison_lines(results, quant: str, context: int, batch: int) -> list[str]:
    """One row per set-up: kind, fit, GB per memory, ceilings and cost."""
    lines = ["", f"comparison ({quant}, context {context:,}, batch {batch}):",
             f"  {'set-up':<44}{'kind':<9}{'fits':<6}{'GPU GB':>8}{'DDR GB':>8}{'decode/s':>10}"
             f"{'prefill/s':>11}{'$/hour':>9}{'$/1M tok':>10}"]
    for r in results:
        pre = f"{r.prefill_tokens_per_s:,.0f}" if r.prefill_tokens_per_s else "n/a"
        lines.append(f"  {r.setup:<44}{r.kind:<9}{'yes' if r.fits else 'no':<6}{r.stored_gb.get('gpu', 0):>8,.1f}"
                     f"{r.stored_gb.get('ddr', 0):>8,.1f}{r.decode_tokens_per_s:>10,.1f}{pre:>11}"
                     f"{r.cost_per_hour:>9,.2f}{r.usd_per_million_tokens:>10,.2f}")
    return lines


def _serve_chart(path: str, cfg, hw, model_name: str, context: int, batch: int, ddr_gb: float | None,
                 defaults: dict[str, Any]) -> None:
    """Decode ceilings by set-up kind and weight format (0 where the model does not fit)."""
    from gasungbi.plan.charts import serve_chart
    from gasungbi.plan.serving import compare_setups

    rows: dict[str, dict[str, float]] = {}
    for q in ("bf16", "fp8", "int8", "int4", "q4_k_m"):
        for r in compare_setups(cfg, hw, q, context, batch, ddr_gb, **defaults):
            label = r.kind + "\n" + r.setup.split(" (")[0]
            label = label if r.kind != "all-HBM" else f"all-HBM\n(N x {(hw.gpu or defaults['default_gpu']).key})"
            rows.setdefault(label, {})[q] = r.decode_tokens_per_s if r.fits else 0.0
    serve_chart(path, rows, f"{model_name}: decode ceiling, context {context:,}, batch {batch}")


# ---------------------------------------------------------------------------------------------
# plan here
# ---------------------------------------------------------------------------------------------

def _here(args: SimpleNamespace) -> int:
    import torch

    from gasungbi.plan.local import local_decode
    from gasungbi.plan.measure import measure_matmul_flops, measure_memory_bandwidth

    cfg = opt.model(args.model)
    context = opt.check(args.context, "--context", lo=0)
    bw = measure_memory_bandwidth()
    flops = measure_matmul_flops(torch.float32)
    rows = [local_decode(cfg, bw, flops, q, context) for q in ("fp32", "int8", "int4")]
    data = {"model": args.model, "memory_bandwidth_bytes_per_s": bw, "matmul_flops_fp32": flops,
            "threads": torch.get_num_threads(), "context": context, "decode": rows}
    lines = [f"memory bandwidth  {bw / 1e9:,.1f} GB/s (STREAM-style copy of 256 MB, best of 5)",
             f"matmul            {flops / 1e9:,.1f} GFLOP/s (fp32 1024x1024 torch.matmul, {torch.get_num_threads()} threads)",
             f"{args.model} decode at context {context}, our engine, batch 1 (ceilings; the lower is the prediction):",
             f"  {'weights':<8}{'MB/token':>10}{'memory-bound/s':>16}{'compute-bound/s':>17}{'predicted/s':>13}"]
    for r in rows:
        lines.append(f"  {r['quant']:<8}{r['bytes_per_token'] / 1e6:>10,.2f}{r['memory_bound_tokens_per_s']:>16,.1f}"
                     f"{r['compute_bound_tokens_per_s']:>17,.1f}{r['predicted_tokens_per_s']:>13,.1f}")
    lines.append("  (tiny models are bound by per-operator overhead, not by these ceilings)")
    return _emit(args, data, lines)


# ---------------------------------------------------------------------------------------------
# plan model
# ---------------------------------------------------------------------------------------------

def _model_cmd(args: SimpleNamespace) -> int:
    from gasungbi.plan.counts import model_accounting

    cfg = opt.model(args.model)
    seq_len = opt.check(args.seq_len, "--seq-len", lo=1)
    acc = model_accounting(cfg, seq_len)
    lines = [f"{args.model}: {'MLA' if cfg.is_mla else 'GQA'}, {cfg.num_hidden_layers} layers",
             f"  {'component':<16}{'total':>10}{'activated':>11}"]
    for k, v in acc["components"].items():
        lines.append(f"  {k:<16}{_si(v['total']):>10}{_si(v['activated']):>11}")
    lines.append(f"  {'main model':<16}{_si(acc['total']):>10}{_si(acc['activated']):>11}"
                 + (f"   (+{_si(acc['mtp_total'])} MTP, not served)" if acc["mtp_total"] else ""))
    lines += ["", f"  {'weights':<8}{'bits/w':>7}{'total GB':>11}{'activated GB':>14}"]
    for q, b in acc["weight_bytes"].items():
        lines.append(f"  {q:<8}{acc['bits_per_weight'][q]:>7g}{b['total'] / 1e9:>11,.2f}{b['activated'] / 1e9:>14,.2f}")
    kv = acc["kv_bytes_per_token_bf16"]
    lines += ["", f"  KV cache per token (bf16): {kv['this_model']:,} bytes; MHA model of the same shape: "
                  f"{kv['mha_equivalent']:,} bytes ({kv['mha_equivalent'] / kv['this_model']:.1f}x)",
              f"  training FLOPs per token at {seq_len}: {acc['training_flops_per_token'] / 1e9:,.4g} GFLOP"]
    return _emit(args, {"model": args.model, **acc}, lines)



# ---------------------------------------------------------------------------------------------
# plan backtest
# ---------------------------------------------------------------------------------------------

def _backtest(args: SimpleNamespace) -> int:
    from gasungbi.plan.backtest import format_backtest, run_backtest

    bt = run_backtest(opt.catalog(args), args.run, decode=args.decode)
    return _emit(args, bt.to_dict(), format_backtest(bt, sources=args.sources))
