"""PNG charts of training runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def preload() -> None:
    """Import matplotlib now (about a second on a small CPU), e.g. before a time budget's training starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def loss_curve(history: list[dict], path: str | Path) -> Path | None:
    """Training loss against tokens, with validation bits per byte on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["tokens"], h["lm_loss"]) for h in history if "lm_loss" in h and "tokens" in h]
    val = [(h["step"], h["val_bpb"]) for h in history if h.get("val_bpb") is not None]
    if not train:
        return None
    steps_to_tokens = {h["step"]: h["tokens"] for h in history if "tokens" in h}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss (nats/token)", color="tab:blue")
    ax.set_xlabel("tokens")
    ax.set_ylabel("train loss (nats/token)")
    if val:
        ax2 = ax.twinx()
        xs = [steps_to_tokens.get(s, float("nan")) for s, _ in val]
        ax2.plot(xs, [v for _, v in val], "o-", color="tab:orange", label="val bits/byte")
        ax2.set_ylabel("validation bits per byte")
    ax.set_title("gasungbi training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
