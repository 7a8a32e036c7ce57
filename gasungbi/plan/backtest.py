"""The planner against published runs it was not calibrated on (``gasungbi plan backtest``).

``published.json`` beside this file lists training runs (GPU-hours or wall-clock seconds) and
decode measurements (tokens/s), one cited source each. The planner predicts each from the model's
shape and the hardware alone, with three constants, each set by one row (``calibrates``):

* ``train_moe``: the BF16 MFU of a mixture-of-experts run, from DeepSeek-V3's 2.664M H800-hours;
* ``train_dense``: the BF16 MFU of a dense run, from Llama 3.1 405B's 30.84M H100-hours;
* ``decode``: the share of the decode ceiling (``estimate_serve``) reached, from KTransformers'
  single-socket 8.73 tokens/s.

A row's implied MFU is against the dense peak *of the precision its matmuls used* (FP8 for
DeepSeek-V3). The two training constants are kept against the BF16 peak, so that the MoE constant,
set by an FP8 run, predicts BF16 runs too: FP8 counts as ``FP8_TRAINING_SPEEDUP`` (torchao's
published end-to-end speed-ups) over BF16, not as the 2x of the peaks (``_bf16_equivalent``).
Training FLOPs are ``flops_per_token`` (6 x activated + attention, PaLM's convention),
summed over a row's phases, each at its own sequence length: attention is 12 x layers x width x
seq per token (forward and backward over the full T x T, no causal halving, for every row and
calibrator alike), so a long-context stage (Llama 3.1's, up to 128K) costs a small model far more
per token than its 8K pass. A decode row may name ``data_parallel`` parts, held whole by every GPU
(see ``decode_ceiling``).
Every other row is a prediction; the summary gives the median and the worst error over them, rows
of the local machine included when asked for (``here_row``: one of our training runs;
``here_decode_row``: a decode report of our engine, written by ``gasungbi generate --report``).
Importing this module needs no torch (measuring the local machine for ``here_decode_row`` does).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gasungbi.config import from_hf_config
from gasungbi.presets import get_preset
from gasungbi.plan.catalog import Catalog, Gpu, Hardware, parse_hardware
from gasungbi.plan.counts import CountModel, Model, flops_per_token, is_moe, quant_bits
from gasungbi.plan.local import local_decode
from gasungbi.plan.runs import read_run
from gasungbi.plan.serving import Setup, estimate_serve
from gasungbi.plan.training import FP8_TRAINING_SPEEDUP

PUBLISHED = Path(__file__).with_name("published.json")
CALIBRATION_KINDS = ("train_moe", "train_dense", "decode")


@dataclass
class Row:
    """One published measurement, the planner's prediction of it, and what they imply."""

    name: str
    kind: str               # "train" or "decode"
    unit: str               # "GPU-hours", "s on N GPUs" or "tokens/s"
    published: float
    predicted: float
    efficiency: float       # implied MFU (train) or share of the decode ceiling (decode)
    efficiency_label: str
    calibrates: str | None
    source: str
    misses: str | None

    @property
    def error(self) -> float:
        """predicted / published - 1."""
        return self.predicted / self.published - 1

    @property
    def ratio(self) -> float:
        """The factor between prediction and figure, >= 1 either way."""
        r = self.predicted / self.published
        return max(r, 1 / r)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error": self.error, "ratio": self.ratio}


@dataclass
class Backtest:
    rows: list[Row]
    constants: dict[str, float]

    @property
    def predicted_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.calibrates]

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(r.error) for r in self.predicted_rows)

    @property
    def worst(self) -> Row:
        return max(self.predicted_rows, key=lambda r: r.ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"constants": self.constants, "rows": [r.to_dict() for r in self.rows],
                "calibration_rows": [r.name for r in self.rows if r.calibrates],
                "median_abs_error": self.median_abs_error, "worst": self.worst.name,
                "worst_ratio": self.worst.ratio}


def load_published(path: str | Path = PUBLISHED) -> list[dict[str, Any]]:
    """The rows of ``published.json``, checked: each has a name, a kind, a source and a figure, and
    each calibration constant is set by exactly one row."""
    rows = json.loads(Path(path).read_text())["rows"]
    seen: dict[str, str] = {}
    for i, row in enumerate(rows):
        where = f"{path}: rows[{i}] ({row.get('name', '?')})"
        for key in ("name", "kind", "model", "hardware", "published", "source"):
            if not row.get(key):
                raise ValueError(f"{where}: missing {key!r}")
        if row["kind"] not in ("train", "decode"):
            raise ValueError(f"{where}: kind must be 'train' or 'decode'")
        want = ("gpu_hours", "seconds") if row["kind"] == "train" else ("tokens_per_s",)
        if not any(k in row["published"] for k in want):
            raise ValueError(f"{where}: published needs one of {want}")
        c = row.get("calibrates")
        if c is not None:
            if c not in CALIBRATION_KINDS or c in seen:
                raise ValueError(f"{where}: calibrates {c!r} must be one of {CALIBRATION_KINDS}, once each")
            seen[c] = row["name"]
    if set(seen) != set(CALIBRATION_KINDS):
        raise ValueError(f"{path}: no row calibrates {sorted(set(CALIBRATION_KINDS) - set(seen))}")
    return rows


def row_model(spec: dict[str, Any]) -> Model:
    """``{"preset": name}``, ``{"hf": config dict}`` or ``{"counts": CountModel fields}``."""
    if "preset" in spec:
        return get_preset(spec["preset"])
    if "hf" in spec:
        return from_hf_config(spec["hf"])
    return CountModel(**spec["counts"])


def _peak_tflops(gpu: Gpu, precision: str) -> float:
    if precision == "fp8":
        if not gpu.fp8_tflops:
            raise ValueError(f"{gpu.key} has no FP8 peak")
        return gpu.fp8_tflops
    return gpu.bf16_tflops


def _bf16_equivalent(gpu: Gpu, precision: str) -> float:
    """The factor from an MFU against ``precision``'s peak to one against the BF16 peak that the same
    run would take in BF16: 1 for BF16, FP8 peak / BF16 peak / FP8_TRAINING_SPEEDUP for FP8."""
    return _peak_tflops(gpu, precision) / gpu.bf16_tflops / (FP8_TRAINING_SPEEDUP if precision == "fp8" else 1)


def _train_flops(row: dict[str, Any], model: Model) -> float:
    return sum(p["tokens"] * flops_per_token(model, p["seq_len"]) for p in row["phases"])


def _published_gpu_hours(row: dict[str, Any]) -> tuple[float, str, float]:
    """(GPU-hours, display unit, display divisor: figure = GPU-hours x 3600 / divisor)."""
    pub = row["published"]
    if "gpu_hours" in pub:
        return pub["gpu_hours"], "GPU-hours", 3600.0
    return pub["seconds"] * pub["count"] / 3600, f"s on {pub['count']} GPUs", float(pub["count"])


def implied_mfu(row: dict[str, Any], catalog: Catalog) -> float:
    model = row_model(row["model"])
    gpu = catalog.lookup(row["hardware"])
    hours, _, _ = _published_gpu_hours(row)
    return _train_flops(row, model) / (hours * 3600 * _peak_tflops(gpu, row["precision"]) * 1e12)


def decode_ceiling(row: dict[str, Any], catalog: Catalog) -> float:
    """tokens/s at the roofline ceiling, per ``per_unit`` (e.g. per node of an 18-node unit).

    ``data_parallel`` names the parts (``estimate_serve``'s ``parts_gb`` keys) that every GPU of the
    set-up holds whole, as DeepSeek's decode units replicate MLA and the shared expert on each of
    144 GPUs while only the routed experts are sharded. ``estimate_serve`` (and so ``plan serve``)
    splits every part across the GPUs; here each copy is read once per step."""
    hw = parse_hardware(row["hardware"], catalog)
    setup = Setup(row["name"], hw.gpu, hw.gpu_count, hw.memory, hw.memory_count)
    est = estimate_serve(row_model(row["model"]), setup, row["quant"], row["context"], row["batch"])
    if not est.fits:
        raise ValueError(f"{row['name']}: the model does not fit the set-up ({'; '.join(est.notes)})")
    step = row["batch"] / est.decode_tokens_per_s  # max(memory time, compute time), every part split
    replicated = row.get("data_parallel", ())
    if replicated and hw.gpu_count > 1:
        # Data-parallel parts: every GPU holds and reads its own copy each step, so the N GPUs read
        # N copies where the split ceiling counts one. The memory time grows by (N - 1) copies over
        # the N GPUs' bandwidth; a compute-bound step stays as long as it was.
        copy_bytes = sum(est.parts_gb[p] for p in replicated) * 1e9
        extra = (hw.gpu_count - 1) * copy_bytes / (hw.gpu_count * hw.gpu.bandwidth_gbs * 1e9)
        memory_time = sum(est.read_gb_per_step[m] * 1e9 / bw for m, bw in _bandwidths(hw).items())
        step = max(step, memory_time + extra)
    return row["batch"] / step / row.get("per_unit", 1)


def _bandwidths(hw: Hardware) -> dict[str, float]:
    """Bytes/s of each memory of a set-up, as ``estimate_serve`` sums them."""
    out = {}
    if hw.gpu:
        out["gpu"] = hw.gpu.bandwidth_gbs * 1e9 * hw.gpu_count
    if hw.memory:
        out["ddr"] = hw.memory.bandwidth_gbs * 1e9 * hw.memory_count
    return out


def calibrate(rows: list[dict[str, Any]], catalog: Catalog) -> dict[str, float]:
    """The three constants, each from its one calibrating row."""
    out = {}
    for row in rows:
        c = row.get("calibrates")
        if c in ("train_moe", "train_dense"):
            out[c] = implied_mfu(row, catalog) * _bf16_equivalent(catalog.lookup(row["hardware"]), row["precision"])
        elif c == "decode":
            out[c] = row["published"]["tokens_per_s"] / decode_ceiling(row, catalog)
    return out


def predict(row: dict[str, Any], catalog: Catalog, constants: dict[str, float]) -> Row:
    """The planner's figure for ``row`` at the calibrated constants."""
    misses, calib = row.get("misses"), row.get("calibrates")
    if row["kind"] == "train":
        model = row_model(row["model"])
        gpu = catalog.lookup(row["hardware"])
        mfu = constants["train_moe" if is_moe(model) else "train_dense"] / _bf16_equivalent(gpu, row["precision"])
        hours = _train_flops(row, model) / (mfu * _peak_tflops(gpu, row["precision"]) * 1e12) / 3600
        pub_hours, unit, div = _published_gpu_hours(row)
        published = row["published"].get("gpu_hours", row["published"].get("seconds"))
        return Row(row["name"], "train", unit, published, hours * 3600 / div if div != 3600 else hours,
                   implied_mfu(row, catalog), f"MFU ({row['precision']} peak)", calib, row["source"], misses)
    ceiling = decode_ceiling(row, catalog)
    pub = row["published"]["tokens_per_s"]
    return Row(row["name"], "decode", "tokens/s", pub, constants["decode"] * ceiling, pub / ceiling,
               "of ceiling", calib, row["source"], misses)


def here_row(run_dir: str | Path, constants: dict[str, float]) -> Row:
    """A row for one of our training runs (``report.json`` with ``peak_flops_per_device`` and
    ``flops_per_token``, as the trainer writes them), predicted at the dense MFU."""
    run = read_run(run_dir)
    data = json.loads(Path(run.path).read_text()) if run.path.endswith(".json") else {}
    for key in ("peak_flops_per_device", "flops_per_token"):
        if not isinstance(data.get(key), (int, float)) or data[key] <= 0:
            raise ValueError(f"{run.path}: needs a positive {key!r} (written by `gasungbi train`)")
    predicted = constants["train_dense"] * data["peak_flops_per_device"] * run.device_count / data["flops_per_token"]
    return Row(f"this machine: {run.name} training ({run.device_count}x {run.device})", "train", "tokens/s",
               run.tokens_per_s, predicted, run.mfu, "MFU (measured peak)", None, f"{run.path} (measured here)",
               "a CPU or a tiny model: per-operator overhead, not the matmul peak, sets the speed; the "
               "MFU of large GPU runs does not carry over")


def read_decode_report(path: str | Path) -> dict[str, Any]:
    """A ``gasungbi generate --report`` file, checked: batch-1, non-speculative decode on a CPU of
    the host that runs the backtest, with a config.json the planner reads and a weight format it knows."""
    import platform

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--decode {path}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"--decode {path}: not JSON (write it with gasungbi generate --report FILE)") from None
    if not isinstance(data, dict) or data.get("kind") != "gasungbi decode":
        raise ValueError(f"--decode {path}: not a decode report (write it with gasungbi generate --report FILE)")
    for key in ("config", "weights", "batch_size", "prompt_tokens", "new_tokens", "decode_tokens_per_s", "device",
                "threads", "machine"):
        if key not in data:
            raise ValueError(f"--decode {path}: missing {key!r}")
    if data["batch_size"] != 1 or data.get("speculative"):
        raise ValueError(f"--decode {path}: the row predicts batch-1 decode without speculation; this report has "
                         f"batch {data['batch_size']}{' and speculative decoding' if data.get('speculative') else ''}"
                         " (run gasungbi generate with one prompt)")
    if not str(data["device"]).startswith("cpu"):
        raise ValueError(f"--decode {path}: decoded on {data['device']}; the row predicts decode from this machine's "
                         "memory (run gasungbi generate --device cpu)")
    if not data["decode_tokens_per_s"] > 0:
        raise ValueError(f"--decode {path}: no decode tokens timed (ask for more than one new token)")
    host = data["machine"].get("host") if isinstance(data["machine"], dict) else None
    if host != platform.node():
        raise ValueError(f"--decode {path}: measured on host {host!r}, not this one ({platform.node()!r}); the "
                         "prediction uses this machine's bandwidth, so run the backtest where the report was made")
    return data


def here_decode_row(report: str | Path, constants: dict[str, float]) -> Row:
    """A row for our engine's measured batch-1 decode (a ``gasungbi generate --report`` file made on
    the local machine) beside the planner's prediction: the decode constant x ``plan here``'s ceiling
    (``local_decode``, the lower of the memory- and compute-bound rates at the local STREAM bandwidth
    and matmul FLOP/s, measured now) for the report's config.json and weights, at its mean context (prompt +
    half the new tokens)."""
    from gasungbi.plan import measure

    data = read_decode_report(report)
    try:
        cfg = from_hf_config(data["config"])
        quant_bits(data["weights"])
    except ValueError as e:
        raise ValueError(f"--decode {report}: {e}") from None
    bw, flops = measure.measure_memory_bandwidth(), measure.measure_matmul_flops()
    context = data["prompt_tokens"] + data["new_tokens"] // 2
    est = local_decode(cfg, bw, flops, data["weights"], context)
    ceiling, measured = est["predicted_tokens_per_s"], data["decode_tokens_per_s"]
    how = "compiled" if data.get("compile") else "eager"
    name = Path(data.get("checkpoint", "?")).name
    return Row(f"this machine: {name} decode ({data['weights']}, {how}, {data['threads']} threads)", "decode",
               "tokens/s", measured, constants["decode"] * ceiling, measured / ceiling, "of ceiling", None,
               f"{report} (measured here: batch 1, {data['prompt_tokens']}-token prompt, {data['new_tokens']} new "
               f"tokens; STREAM copy {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.0f} GFLOP/s, "
               f"{est['bytes_per_token'] / 1e6:.1f} MB read per token)",
               "a small model on one CPU is bound by per-operator overhead as much as by bandwidth (int8 more "
               "so: half the bytes of fp32 through the same operators); this ceiling is at the measured STREAM "
               "copy bandwidth, the published rows' at their memory's peak; and the decode constant comes from "
               "KTransformers' engine on a GPU + DDR5 server, not ours")


def run_backtest(catalog: Catalog, run_dir: str | Path | None = None, path: str | Path = PUBLISHED,
                 decode: str | Path | None = None) -> Backtest:
    rows = load_published(path)
    constants = calibrate(rows, catalog)
    out = [predict(r, catalog, constants) for r in rows]
    if run_dir is not None:
        out.append(here_row(run_dir, constants))
    if decode is not None:
        out.append(here_decode_row(decode, constants))
    return Backtest(out, constants)


def format_backtest(bt: Backtest, sources: bool = False) -> list[str]:
    """The table, the constants, the summary and the notes on rows off by more than 25%."""

    def num(x: float) -> str:
        return f"{x:,.1f}" if abs(x) < 1e5 else f"{x:.4g}"

    lines = [f"{'row':<56}{'unit':<15}{'published':>11}{'predicted':>11}{'error':>8}  implied efficiency"]
    for r in bt.rows:
        tag = "  [calibrates]" if r.calibrates else ""
        lines.append(f"{r.name:<56}{r.unit:<15}{num(r.published):>11}{num(r.predicted):>11}{r.error:>+8.0%}  "
                     f"{r.efficiency:.1%} {r.efficiency_label}{tag}")
    c = bt.constants
    lines += ["", "constants (each from its one calibrating row):",
              f"  MoE training MFU    {c['train_moe']:.1%} of the BF16 peak  ({_calibrator(bt, 'train_moe')}; "
              f"an FP8 run: {FP8_TRAINING_SPEEDUP:g}x faster)",
              f"  dense training MFU  {c['train_dense']:.1%} of the BF16 peak  ({_calibrator(bt, 'train_dense')})",
              f"  decode efficiency   {c['decode']:.1%} of the roofline ceiling  ({_calibrator(bt, 'decode')})",
              "", f"over the {len(bt.predicted_rows)} rows not used for calibration: median |error| "
                  f"{bt.median_abs_error:.1%}, worst {bt.worst.name} ({bt.worst.error:+.0%}, "
                  f"{bt.worst.ratio:.2f}x)"]
    off = [r for r in bt.predicted_rows if abs(r.error) > 0.25 and r.misses]
    if off:
        lines += ["", "rows off by more than 25%, and what the planner does not model:"]
        lines += [f"  {r.name}: {r.misses}" for r in off]
    if sources:
        lines += ["", "sources:"] + [f"  {r.name}: {r.source}" for r in bt.rows]
    return lines


def _calibrator(bt: Backtest, kind: str) -> str:
    return next(r.name for r in bt.rows if r.calibrates == kind)
