"""PNG charts for ``gasungbi plan`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def train_chart(path: str | Path, curves: dict[str, float], point: tuple[str, float, float]) -> None:
    """Dollars against training tokens, one line per GPU type, log-log. ``curves`` maps a label to
    dollars per token; ``point`` = (label, tokens, dollars) marks the requested run."""
    plt = _pyplot()
    label, tokens, dollars = point
    xs = [tokens * f for f in (0.01, 0.03, 0.1, 0.3, 1, 3)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_token in curves.items():
        ax.plot(xs, [x * per_token for x in xs], label=name, lw=2 if name == label else 1)
    ax.scatter([tokens], [dollars], color="black", zorder=3)
    ax.annotate(f"${dollars:,.0f}", (tokens, dollars), textcoords="offset points", xytext=(6, -12))
    ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="dollars (rental)",
           title="Training cost against tokens (same MFU on every GPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def serve_chart(path: str | Path, rows: dict[str, dict[str, float]], title: str) -> None:
    """Grouped bars: decode tokens/s ceiling per set-up (group) and quantization (bar).
    ``rows`` maps a set-up label to {quant: tokens/s, or 0 where it does not fit}."""
    plt = _pyplot()
    setups = list(rows)
    quants = list(dict.fromkeys(q for r in rows.values() for q in r))
    width = 0.8 / max(len(quants), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, q in enumerate(quants):
        xs = [j + (i - (len(quants) - 1) / 2) * width for j in range(len(setups))]
        bars = ax.bar(xs, [rows[s].get(q) or float("nan") for s in setups], width, label=q)
        ax.bar_label(bars, fmt="%.3g", fontsize=6)
    ax.set_xticks(range(len(setups)), setups, fontsize=8)
    ax.set(ylabel="decode tokens/s (bandwidth ceiling)", title=title, yscale="log")
    values = [v for r in rows.values() for v in r.values() if v]
    if values:
        ax.set_ylim(min(values) / 3, max(values) * 3)
    ax.legend(fontsize=8, title="weights (no bar: does not fit)", title_fontsize=8, loc="upper left")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
