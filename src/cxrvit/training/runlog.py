"""Run logs: ``metrics.jsonl`` always, TensorBoard when it is installed, learning-curve plot.

Only rank 0 writes. On resume, records written after the checkpoint we resume from (the run
was killed before it could checkpoint them) are dropped, so the log reads like one clean run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from cxrvit.fileio import json_safe

METRICS = "metrics.jsonl"
CURVES = "learning_curves.png"


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = out_dir / METRICS
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step)
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch") and math.isfinite(value):
                    self.tb.add_scalar(f"{record.get('kind', 'log')}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill: everything after it is gone anyway
    return out


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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
