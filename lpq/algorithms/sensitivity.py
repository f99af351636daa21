"""Sensitivity analysis: which blocks to keep in high precision within the format's budget."""
from __future__ import annotations

from pathlib import Path


def choose_protected(scores: dict[int, float], k: int) -> list[int]:
    """The k blocks whose quantization alone raises the loss most (ties: lower index first)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ranked = sorted(scores, key=lambda b: (-scores[b], b))
    return ranked[:k]


def plot_sensitivity(scores: dict[int, float], protected: list[int], path: str | Path, title: str = "") -> None:
    """Bar chart of the loss increase per block; protected blocks highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(scores)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(blocks)), 3.2))
    colors = ["tab:red" if b in protected else "tab:blue" for b in blocks]
    ax.bar([str(b) for b in blocks], [scores[b] for b in blocks], color=colors)
    ax.set_xlabel("block")
    ax.set_ylabel("loss increase (nats/token)")
    ax.set_title(title or "sensitivity: only this block quantized (red: protected)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
