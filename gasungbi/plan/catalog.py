"""The hardware catalog: GPUs and CPU memory platforms, with a source for every figure.

The shipped figures live in ``hardware.json`` beside this file. Users add entries, or override
single fields of shipped ones (say a cheaper price), in files of their own with the same layout:
``~/.config/gasungbi/hardware.json`` (``$XDG_CONFIG_HOME`` is honoured) and any ``--catalog FILE``,
applied in that order. Every field is checked; a bad one raises :class:`CatalogError` naming the
file, the entry and the field.

Units: ``memory_gb`` in GB (1e9 bytes), ``bandwidth_gbs`` in GB/s, ``*_tflops`` dense peak in
1e12 FLOP/s, ``nvlink_gbs`` (GPU to GPU in a node, both directions together, as NVIDIA quotes it)
and ``network_gbs`` (the scale-out NIC per GPU, one direction: 400 Gb/s = 50 GB/s) in GB/s, optional
(null: none or unknown; the expert-parallel estimate needs them), ``price_per_hour`` in USD per
GPU-hour (rental), ``price_per_gb`` and ``platform_price`` in USD (purchase: the planner amortizes
them, see ``serving.py``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("hardware.json")


class CatalogError(ValueError):
    """A catalog file or a hardware name the user gave is wrong; the message names what."""


# field -> (required, may be null). ``name``, ``aliases`` and ``source`` are handled separately.
GPU_FIGURES = {"memory_gb": (True, False), "bandwidth_gbs": (True, False), "bf16_tflops": (True, False),
               "fp8_tflops": (False, True), "price_per_hour": (True, False),
               "nvlink_gbs": (False, True), "network_gbs": (False, True)}
MEMORY_FIGURES = {"channels": (False, False), "mts": (False, False), "bandwidth_gbs": (False, False),
                  "memory_gb": (True, False), "price_per_gb": (True, False), "platform_price": (False, False),
                  "tflops": (False, True)}


@dataclass
class Gpu:
    """An accelerator: its memory (HBM or GDDR), dense tensor peaks and a rental price."""

    key: str
    name: str
    memory_gb: float
    bandwidth_gbs: float
    bf16_tflops: float
    fp8_tflops: float | None
    price_per_hour: float
    aliases: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)
    kind: str = "gpu"
    nvlink_gbs: float | None = None   # GPU-to-GPU within a node, both directions together (vendor figure)
    network_gbs: float | None = None  # scale-out network (InfiniBand/RoCE) per GPU, each direction


@dataclass
class MemoryPlatform:
    """A CPU socket's DRAM: bandwidth = channels x MT/s x 8 bytes, capacity, purchase prices, and a
    rough peak matmul rate of a representative CPU (``tflops``, used only for prefill estimates)."""

    key: str
    name: str
    bandwidth_gbs: float
    memory_gb: float
    price_per_gb: float
    platform_price: float = 0.0
    tflops: float | None = None
    channels: int | None = None
    mts: int | None = None
    aliases: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)
    kind: str = "memory"


@dataclass
class Catalog:
    gpus: dict[str, Gpu]
    memory: dict[str, MemoryPlatform]

    def names(self) -> list[str]:
        return [*self.gpus, *self.memory]

    def lookup(self, name: str) -> Gpu | MemoryPlatform:
        """The entry called ``name`` (key or alias, case and spaces ignored)."""
        want = _norm(name)
        for entry in (*self.gpus.values(), *self.memory.values()):
            if want == _norm(entry.key) or want in {_norm(a) for a in entry.aliases}:
                return entry
        raise CatalogError(f"unknown hardware {name!r}; known: {', '.join(self.names())}")

    def match_device(self, device: str) -> Gpu | None:
        """The GPU whose key or alias occurs in a device string such as torch's
        ``'NVIDIA H100 80GB HBM3'``; ``None`` when nothing matches (e.g. ``'cpu'``)."""
        text = _norm(device)
        best: tuple[int, Gpu] | None = None
        for gpu in self.gpus.values():
            for n in (gpu.key, *gpu.aliases, gpu.key.split("-")[0]):
                if len(_norm(n)) >= 3 and _norm(n) in text and (best is None or len(_norm(n)) > best[0]):
                    best = (len(_norm(n)), gpu)
        return best[1] if best else None


def custom_gpu(peak_tflops: float, bandwidth_gbs: float, memory_gb: float | None = None,
               price_per_hour: float | None = None, fp8_tflops: float | None = None) -> Gpu:
    """An accelerator that is not in the catalog, from its dense peak (TFLOPS, in the precision
    the work runs in), memory bandwidth (GB/s) and optionally its memory (GB; unknown = unlimited,
    so fits are not checked) and price (USD per hour; unknown = 0, so costs read $0)."""
    for name, value in (("peak TFLOPS", peak_tflops), ("bandwidth", bandwidth_gbs)):
        if not value > 0:
            raise CatalogError(f"custom hardware: {name} must be positive, got {value!r}")
    if memory_gb is not None and not memory_gb > 0:
        raise CatalogError(f"custom hardware: memory must be positive, got {memory_gb!r}")
    name = f"custom ({peak_tflops:g} TFLOPS, {bandwidth_gbs:g} GB/s" + (f", {memory_gb:g} GB)" if memory_gb else ")")
    given = "given on the command line"
    return Gpu(key="custom", name=name, memory_gb=float("inf") if memory_gb is None else float(memory_gb),
               bandwidth_gbs=float(bandwidth_gbs), bf16_tflops=float(peak_tflops), fp8_tflops=fp8_tflops,
               price_per_hour=0.0 if price_per_hour is None else float(price_per_hour),
               source={"memory_gb": given if memory_gb else "not given: unlimited", "bandwidth_gbs": given,
                       "bf16_tflops": given, "price_per_hour": given if price_per_hour is not None else "not given: 0"})


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "", s.lower()).replace("nvidia", "").replace("geforce", "")


def user_catalog_path() -> Path:
    """``$XDG_CONFIG_HOME/gasungbi/hardware.json`` (default ``~/.config/...``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gasungbi" / "hardware.json"


def load_catalog(extra: list[str | Path] | tuple = (), user_config: bool = True) -> Catalog:
    """The shipped catalog, then the user's config file (if present), then each ``extra`` file."""
    raw: dict[str, dict[str, dict[str, Any]]] = {"gpus": {}, "memory": {}}
    paths = [SHIPPED]
    if user_config and user_catalog_path().exists():
        paths.append(user_catalog_path())
    for p in extra:
        if not Path(p).exists():
            raise CatalogError(f"catalog file {p} does not exist")
        paths.append(Path(p))
    for path in paths:
        _merge(raw, _read(path), path, shipped=path == SHIPPED)
    return Catalog({k: _gpu(k, v) for k, v in raw["gpus"].items()},
                   {k: _memory(k, v) for k, v in raw["memory"].items()})


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CatalogError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected an object with 'gpus' and/or 'memory'")
    unknown = set(data) - {"gpus", "memory"} - {k for k in data if k.startswith("_")}
    if unknown:
        raise CatalogError(f"{path}: unknown section(s) {sorted(unknown)}; expected 'gpus' and/or 'memory'")
    return data


def _merge(raw: dict, data: dict, path: Path, shipped: bool) -> None:
    """Overlay ``data`` on ``raw``, validating each field; new entries must be complete."""
    for section, figures in (("gpus", GPU_FIGURES), ("memory", MEMORY_FIGURES)):
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            raise CatalogError(f"{path}: '{section}' must map names to entries")
        for key, entry in entries.items():
            where = f"{path}: {section}.{key}"
            if not isinstance(entry, dict):
                raise CatalogError(f"{where}: must be an object of fields")
            allowed = set(figures) | {"name", "aliases", "source"}
            for f in entry:
                if f not in allowed:
                    raise CatalogError(f"{where}: unknown field {f!r}; known fields: {', '.join(sorted(allowed))}")
            for f, value in entry.items():
                if f in figures:
                    _check_number(where, f, value, nullable=figures[f][1])
            if "aliases" in entry and not (isinstance(entry["aliases"], list)
                                           and all(isinstance(a, str) for a in entry["aliases"])):
                raise CatalogError(f"{where}.aliases: must be a list of strings")
            source = entry.get("source", {})
            if isinstance(source, str):  # one source for all the figures this file sets
                source = {f: source for f in entry if f in figures}
            if not isinstance(source, dict):
                raise CatalogError(f"{where}.source: must be a string or an object keyed by field")
            merged = {**raw[section].get(key, {"source": {}}), **entry}
            merged["source"] = {**raw[section].get(key, {}).get("source", {}), **source}
            for f in entry:  # a figure set here without its own source is sourced to this file
                if f in figures and f not in source and f not in ("channels", "mts"):  # these define the entry
                    if shipped:
                        raise CatalogError(f"{where}.source: no source for {f!r}")
                    merged["source"][f] = f"user catalog {path}"
            if section == "memory" and "bandwidth_gbs" not in merged:
                if merged.get("channels") and merged.get("mts"):
                    merged["bandwidth_gbs"] = merged["channels"] * merged["mts"] * 8 / 1000
                    merged["source"]["bandwidth_gbs"] = "theoretical: channels x MT/s x 8 bytes"
            for f, (required, _) in figures.items():
                if required and f not in merged:
                    raise CatalogError(f"{where}: missing field {f!r}")
            if section == "memory" and "bandwidth_gbs" not in merged:
                raise CatalogError(f"{where}: missing field 'bandwidth_gbs' (or 'channels' and 'mts')")
            raw[section][key] = merged


def _check_number(where: str, f: str, value: Any, nullable: bool) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or (value == 0 and f not in ("price_per_hour", "price_per_gb", "platform_price")):
        raise CatalogError(f"{where}.{f}: must be a positive number, got {value!r}")


def _gpu(key: str, d: dict) -> Gpu:
    return Gpu(key=key, name=d.get("name", key), memory_gb=float(d["memory_gb"]),
               bandwidth_gbs=float(d["bandwidth_gbs"]), bf16_tflops=float(d["bf16_tflops"]),
               fp8_tflops=None if d.get("fp8_tflops") is None else float(d["fp8_tflops"]),
               price_per_hour=float(d["price_per_hour"]), aliases=list(d.get("aliases", [])),
               source=dict(d["source"]), nvlink_gbs=_opt(d.get("nvlink_gbs")), network_gbs=_opt(d.get("network_gbs")))


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _memory(key: str, d: dict) -> MemoryPlatform:
    return MemoryPlatform(key=key, name=d.get("name", key), bandwidth_gbs=float(d["bandwidth_gbs"]),
                          memory_gb=float(d["memory_gb"]), price_per_gb=float(d["price_per_gb"]),
                          platform_price=float(d.get("platform_price", 0.0)),
                          tflops=None if d.get("tflops") is None else float(d["tflops"]),
                          channels=d.get("channels"), mts=d.get("mts"), aliases=list(d.get("aliases", [])),
                          source=dict(d["source"]))


# ---------------------------------------------------------------------------------------------
# Hardware specs on the command line: "rtx4090 + ddr5-8ch-4800", "8x h200", "2 x rtx4090 + ddr5-desktop"
# ---------------------------------------------------------------------------------------------

@dataclass
class Hardware:
    """A parsed ``--hardware`` spec: at most one GPU type and one memory platform, each with a count."""

    gpu: Gpu | None = None
    gpu_count: int = 0
    memory: MemoryPlatform | None = None
    memory_count: int = 0


def parse_hardware(spec: str, catalog: Catalog) -> Hardware:
    """Parse ``"[N x] gpu + [M x] memory-platform"``; either part may be left out."""
    hw = Hardware()
    parts = [p.strip() for p in spec.split("+")]
    if not spec.strip() or any(not p for p in parts):
        raise CatalogError(f"bad --hardware {spec!r}; write e.g. 'rtx4090 + ddr5-8ch-4800' or '8x h200'")
    for part in parts:
        m = re.fullmatch(r"(?:(\d+)\s*[x*]\s*)?(.+)", part)
        count = int(m.group(1) or 1)
        if count < 1:
            raise CatalogError(f"bad count in --hardware part {part!r}: must be at least 1")
        entry = catalog.lookup(m.group(2))
        if isinstance(entry, Gpu):
            if hw.gpu is not None:
                raise CatalogError(f"--hardware {spec!r} names two GPU types; use one (with a count: '2x rtx4090')")
            hw.gpu, hw.gpu_count = entry, count
        else:
            if hw.memory is not None:
                raise CatalogError(f"--hardware {spec!r} names two memory platforms; use one (with a count)")
            hw.memory, hw.memory_count = entry, count
    return hw
