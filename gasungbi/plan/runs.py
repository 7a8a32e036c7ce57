"""What one of our training runs measured: its throughput and MFU, read back from its run directory
(``report.json`` or ``metrics.jsonl``, both written by the trainer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunReport:
    """What one of our training runs measured (``DIR/report.json``, written by the trainer)."""

    tokens_per_s: float
    mfu: float
    device: str
    device_count: int
    model: Any  # a preset name, a checkpoint path or a Hugging Face config dict
    path: str
    name: str = "run model"  # the preset name when the report gives one


def read_run(run_dir: str | Path) -> RunReport:
    """Read ``report.json`` from a run directory, else the last line of ``metrics.jsonl`` that has
    ``tokens_per_s`` and ``mfu``. ``ValueError`` naming the file and the missing key otherwise."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"--from-run {d}: no such run directory")
    data: dict[str, Any] | None = None
    path = d / "report.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    elif (d / "metrics.jsonl").exists():
        path = d / "metrics.jsonl"
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "tokens_per_s" in row and "mfu" in row:
                data = {**(data or {}), **row}
    if data is None:
        raise ValueError(f"{d} has no report.json (nor a metrics.jsonl line with tokens_per_s and mfu)")
    for key, kind in (("tokens_per_s", (int, float)), ("mfu", (int, float)), ("device", str), ("device_count", int)):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ValueError(f"{path}: {key} has the wrong type: {data[key]!r}")
    if data["tokens_per_s"] <= 0 or data["device_count"] < 1:
        raise ValueError(f"{path}: tokens_per_s must be > 0 and device_count >= 1")
    name = next((v for v in (data.get("preset"), data.get("model")) if isinstance(v, str)), "run model")
    return RunReport(float(data["tokens_per_s"]), float(data["mfu"]), data["device"], data["device_count"],
                     data.get("model"), str(path), name)
