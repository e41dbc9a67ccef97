"""Run logs: ``metrics.jsonl`` (one JSON record a line) always, TensorBoard when it is installed.

The one log of every training loop (supervised: ``train``/``val`` records; pre-training: ``train``/
``probe``). Only rank 0 writes. On resume, records written after the checkpoint we resume from (the run
was killed before it could checkpoint them) are dropped, so the log reads like one clean run. A record
written at the checkpoint's own step but after it (the supervised loop's epoch-end validation, when the
epoch's last step was also a mid-epoch checkpoint) is the loop's to recognise: ``keep``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from cxrvit.fileio import json_safe

METRICS = "metrics.jsonl"


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int | None = None,
                 keep: Callable[[dict], bool] | None = None):
        self.path = out_dir / METRICS
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path)
                    if r.get("step", 0) <= resume_step and (keep is None or keep(r))]
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
