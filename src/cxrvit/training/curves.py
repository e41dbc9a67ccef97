"""The learning-curve plot of a supervised run (``learning_curves.png``), drawn from its ``metrics.jsonl``."""
from __future__ import annotations

from pathlib import Path

from cxrvit.fileio import atomic_write

CURVES = "learning_curves.png"


def plot_learning_curves(records: list[dict], path: Path, scored: list[str]) -> None:
    """Train loss (per logged step), val loss and scored-label AUROC (per epoch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val BCE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[1]
    for name in scored:
        ys = [r["auroc"].get(name) for r in val]
        ax.plot([r["epoch"] for r in val], [float("nan") if y is None else y for y in ys], "o-", label=name)
    if val:
        ax.plot([r["epoch"] for r in val], [r.get("mean_auroc") for r in val], "k--", label="mean (all labels)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUROC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
