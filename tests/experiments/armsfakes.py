"""The arms tests' stand-ins: a training function that writes real bundles, a pre-training that writes files, and a
small arms file."""
from pathlib import Path

import numpy as np
import yaml

from cxrvit.data.preprocess import Preprocessing
from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.evaluate import predict_rows
from cxrvit.inference.bundle import Bundle, save_bundle
from cxrvit.ssl.pretrain import PretrainResult
from evalfakes import tiny_model

TINY = ["model.arch=vit_tiny", "model.img_size=32", "schedule.epochs=1", "schedule.batch_size=16",
        "engine.checkpoint_every=0"]
QUIET = dict(progress=False, n_resamples=30, log=lambda _m: None)


class RecordingTrain:
    """Stands in for training.engine.train; writes a real bundle tuned on its validation rows."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, cache, train_rows, val_rows, out_dir, device=None, resume=False, progress=True,
                 init=None):
        self.calls.append({"dir": str(out_dir), "seed": cfg.engine.seed, "init": init, "resume": resume,
                           "fit": np.array(train_rows), "val": np.array(val_rows)})
        labels = list(cfg.data.labels)
        model = tiny_model(len(labels), seed=cfg.engine.seed % 2)
        bundle = Bundle(model=model, labels=labels, thresholds={}, preprocessing=Preprocessing(size=32),
                        arch="vit_tiny")
        thr = M.tune_thresholds(cache.labels(labels)[val_rows], predict_rows(bundle, cache, val_rows))
        return save_bundle(out_dir, model, labels, dict(zip(labels, thr.tolist())), Preprocessing(size=32),
                           arch="vit_tiny", threshold_source={
                               "split": "val", "images": cache.index["image"].to_numpy()[val_rows].tolist()})


class RecordingPretrain:
    """Stands in for ssl.pretrain.pretrain: writes a backbone and a last.pt, records each call's folder and config."""

    def __init__(self, history=None):
        self.calls = []
        self.history = history if history is not None else [{"epoch": 0, "linear_mean_auroc": 0.5},
                                                            {"epoch": 3, "linear_mean_auroc": 0.6}]

    def __call__(self, cfg, caches, out_dir, rows=None, probe=None, resume=True, quiet=False):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("backbone.safetensors", "last.pt"):
            (out / name).write_bytes(b"weights")
        self.calls.append((out, cfg))
        return PretrainResult(out, out / "backbone.safetensors", 3, list(self.history), seconds=60.0)


def write_plan(path: Path, **extra) -> Path:
    plan = {"reference": "baseline", "protocol": "cv", "folds": 2, "seeds": [0, 1], "overrides": TINY,
            "arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "improved", "recipe": "probe-random"},
                     {"name": "low-lr", "recipe": "baseline", "overrides": ["optim.lr=1e-5"]}]}
    plan.update(extra)
    path.write_text(yaml.safe_dump(plan))
    return path


def patients_of(cache, rows):
    return set(np.asarray(cache.patient_ids)[rows].astype(str))
