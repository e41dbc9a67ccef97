"""Typed pre-training configuration: dataclasses, YAML recipes (``ssl/recipes``) and ``--set`` overrides.

The parsing rules are the training part's (:mod:`cxrvit.training.configparse`): every key must be
known, types are checked, and an error names the key. Only the dataclasses are SSL-specific.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from cxrvit.ssl.dino import DinoConfig
from cxrvit.ssl.ijepa import IJepaConfig
from cxrvit.ssl.mae import MaeConfig
from cxrvit.training.configparse import apply_overrides, build_config, check_all, load_yaml, optimizer_checks

METHODS = ("dino", "mae", "ijepa")


@dataclass
class SSLModelConfig:
    arch: str = "vit_small"
    depth: int = 12                  # fewer blocks only for tests; the exported backbone is DINO layout either way
    patch_size: int = 16
    attention: str = "auto"          # auto | sdpa | explicit, for encoder and decoder/predictor blocks alike


@dataclass
class SSLOptimConfig:
    lr: float = 5e-4                 # for a batch of 256; scaled linearly with the real batch (DINO/MAE rule)
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04       # cosine from weight_decay to weight_decay_end (DINO)
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 3.0           # 0 = off


@dataclass
class SSLScheduleConfig:
    epochs: int = 100
    batch_size: int = 64             # global, all ranks together
    max_steps: int = 0               # stop after this many steps (schedules still span all epochs); 0 = off


@dataclass
class MonitorConfig:
    """The pre-training monitor (section ``probe``): k-NN and linear-probe AUROC of the frozen features at
    intervals (:mod:`cxrvit.ssl.probe`). Not :class:`cxrvit.training.config.ProbeConfig`, the probe *strategy*."""
    every_epochs: int = 10           # 0 = only at the end; probes need a labelled cache
    k: int = 20
    size: int = 224
    batch_size: int = 64


@dataclass
class SSLEngineConfig:
    precision: str = "auto"          # auto (bf16 where native: cxrvit.runtime) | bf16 | fp32
    checkpoint_every: int = 200      # steps between mid-epoch checkpoints; epoch ends always checkpoint
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    source_size: int = 0             # images are resized to this before cropping; 0 = the largest view size


#: Keys that say what a pre-training is called, where it runs and how it is watched, not which backbone it
#: writes: a resume may change them (with ``schedule.max_steps``: cxrvit.ssl.pretrain.RESUMABLE_CHANGES), and
#: a finished stage of an arms plan is reused whatever they say (cxrvit.experiments.identity).
NOT_THE_BACKBONE = ("name", "engine.device", "engine.log_every", "engine.checkpoint_every", "probe")


@dataclass
class PretrainConfig:
    name: str = "custom"
    method: str = "dino"
    # Continued pre-training: the ``last.pt`` of an earlier run of the same method and shapes. The method's
    # weights (encoder and decoder / teacher / predictor) start from it; optimizer, step and schedules start
    # fresh, so ``schedule.epochs`` are *more* epochs (with their own warm-up and cosine). "" = a random start.
    init: str = ""
    model: SSLModelConfig = field(default_factory=SSLModelConfig)
    optim: SSLOptimConfig = field(default_factory=SSLOptimConfig)
    schedule: SSLScheduleConfig = field(default_factory=SSLScheduleConfig)
    probe: MonitorConfig = field(default_factory=MonitorConfig)
    engine: SSLEngineConfig = field(default_factory=SSLEngineConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    ijepa: IJepaConfig = field(default_factory=IJepaConfig)

    def validate(self) -> "PretrainConfig":
        """Raise ``ValueError`` naming the offending key; rows that divide guard themselves (patch size 0)."""
        p, o = self.model.patch_size, self.optim
        sizes = {"dino": [self.dino.global_size, self.dino.local_size], "mae": [self.mae.size],
                 "ijepa": [self.ijepa.size]}
        checks = [
            ("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}"),
            ("engine.precision", self.engine.precision in ("auto", "bf16", "fp32"), "must be auto, bf16 or fp32"),
            ("model.depth", self.model.depth >= 1, "must be >= 1"),
            ("model.patch_size", p >= 1, "must be >= 1"),
            ("model.attention", self.model.attention in ("auto", "sdpa", "explicit"), "must be auto, sdpa or explicit"),
            ("schedule.batch_size", self.schedule.batch_size >= 2, "must be >= 2"),
            ("schedule.epochs", self.schedule.epochs >= 1, "must be >= 1"),
            (f"{self.method} view sizes", p >= 1 and all(s % p == 0 for s in sizes.get(self.method, [p])),
             f"must be multiples of model.patch_size={p}"),
            ("mae.mask_ratio", 0 < self.mae.mask_ratio < 1, "must be in (0, 1)"),
            ("engine.log_every", self.engine.log_every >= 1, "must be >= 1 (steps between train records)"),
            ("engine.checkpoint_every", self.engine.checkpoint_every >= 0, "must be >= 0 (0 = epoch ends only)"),
            ("schedule.max_steps", self.schedule.max_steps >= 0, "must be >= 0 (0 = off)"),
        ] + optimizer_checks(o)
        check_all(self, checks, "pretrain config")
        return self

    @property
    def view_size(self) -> int:
        return {"dino": self.dino.global_size, "mae": self.mae.size, "ijepa": self.ijepa.size}[self.method]


def config_to_dict(cfg: PretrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict, source: str = "config") -> PretrainConfig:
    return build_config(PretrainConfig, d, source)


def recipe_path(name_or_path: str | Path) -> Path:
    shipped = Path(str(resources.files("cxrvit.ssl") / "recipes")) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path)
    if not path.is_file():
        names = sorted(p.stem for p in shipped.parent.glob("*.yaml"))
        raise FileNotFoundError(f"pre-training recipe {str(name_or_path)!r} is neither shipped "
                                f"({', '.join(names)}) nor an existing YAML file")
    return path


def load_pretrain_recipe(recipe: str | Path, overrides: list[str] | None = None,
                         method: str | None = None) -> PretrainConfig:
    """A shipped recipe (``dino``, ``mae``, ``ijepa``) or a YAML path, plus ``--set`` overrides."""
    path = recipe_path(recipe)
    try:
        raw = load_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # the codec's own message names no file
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):  # as a training recipe (training/config.py read_recipe)
        raise ValueError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    if method is not None:
        if raw.get("method", method) != method:
            raise ValueError(f"{path}: recipe is for method {raw['method']!r}, not --method {method}")
        raw["method"] = method
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, source=str(path) + (" + --set" if overrides else ""))


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
