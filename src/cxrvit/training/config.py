"""Typed training configuration: nested dataclasses, YAML recipes and ``key=value`` overrides.

A recipe is a YAML file whose sections mirror :class:`TrainConfig`. Every key must be known:
a typo in a recipe or in ``--set`` is an error that names the key, never a silently ignored
setting. The resolved config is written to ``RUN/config.yaml`` and stored in every checkpoint
as a plain dict (:func:`config_to_dict`), so a run can always say exactly how it was trained.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cxrvit.labels import DEFAULT_LABELS, SCORED_TARGETS, validate_label_names


@dataclass
class ModelConfig:
    arch: str = "vit_small"          # a name from cxrvit.model.vit.ARCHITECTURES
    img_size: int = 224              # training/inference resolution (multiple of the patch size)
    drop_path: float = 0.0           # stochastic depth rate of the last block (linear in depth)
    attention: str = "auto"          # auto | sdpa | explicit (auto: per device and dtype, cxrvit.runtime)
    pos_embed: str = "random"        # start of pos_embed: random (DINO) | sincos (MAE's table); --init overrides


@dataclass
class DataConfig:
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    val_fraction: float = 0.15       # share of training patients carved out for validation
    split_seed: int = 0              # seed of the patient-wise validation carve-out


@dataclass
class OptimConfig:
    lr: float = 5e-4                 # peak learning rate, for the global batch size
    min_lr: float = 1e-6             # end of the cosine
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 1.0       # linear warmup, in (fractional) epochs
    layer_decay: float = 1.0         # 1.0 = off; <1 scales block i's lr by decay**(L+1-i)
    clip_grad: float = 0.0           # max global grad norm; 0 = off
    fused: bool = True               # fused AdamW kernel where the device supports it


@dataclass
class LossConfig:
    kind: str = "bce"                # bce | weighted_bce | focal | asl
    gamma: float = 2.0               # focal: focusing parameter
    alpha: float = -1.0              # focal: positive weight in [0, 1]; <0 = off
    gamma_pos: float = 0.0           # asl
    gamma_neg: float = 4.0           # asl
    clip: float = 0.05               # asl: probability margin for negatives
    max_pos_weight: float = 50.0     # weighted_bce: cap on neg/pos so a rare label cannot dominate


@dataclass
class AugmentConfig:
    enabled: bool = True
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])   # random-resized-crop area
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5               # probability
    rotate: float = 0.0              # max degrees, uniform in [-rotate, rotate]
    translate: float = 0.0           # max shift, fraction of the crop side
    shear: float = 0.0               # max degrees
    brightness: float = 0.0          # additive, fraction of the full range
    contrast: float = 0.0            # multiplicative around the image mean: 1 +- contrast
    gamma: float = 0.0               # log-uniform gamma in [1/(1+g), 1+g]
    mixup: float = 0.0               # Beta(alpha, alpha) for mixup; 0 = off
    cutmix: float = 0.0              # Beta(alpha, alpha) for cutmix; 0 = off
    mix_prob: float = 0.0            # probability that a batch is mixed at all


@dataclass
class ScheduleConfig:
    epochs: int = 30
    batch_size: int = 64             # global batch per optimizer step (all ranks, all accumulation)
    grad_accum: int = 1              # micro-batches per optimizer step


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = True              # decay ramps up as (1 + n) / (10 + n): early EMA tracks the model


@dataclass
class EvalConfig:
    select: str = "mean_auroc_scored"   # mean_auroc_scored | mean_auroc | neg_val_loss
    tta: bool = False                   # average predictions over the identity and a small zoom-in
    batch_size: int = 128


@dataclass
class EngineConfig:
    precision: str = "auto"          # auto | bf16 | fp16 | fp32
    compile: bool = False            # torch.compile the model
    checkpoint_every: int = 200      # optimizer steps between mid-epoch checkpoints; 0 = epoch ends only
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    workers: int = 0                 # loader threads (0 = in the training thread)
    deterministic: bool = True       # torch.use_deterministic_algorithms where it does not fail
    log_every: int = 10


@dataclass
class ProbeConfig:
    """``strategy: linear_probe`` only (cxrvit.training.linear_probe)."""
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])   # inverse L2 strengths tried
    cv_folds: int = 5                # patient folds for choosing C and cross-fitting the thresholds
    views: int = 1                   # feature views per training image: 1 plain + (views - 1) augmented


@dataclass
class TrainConfig:
    name: str = "custom"
    # finetune: the supervised loop (engine.py). linear_probe: frozen backbone + cross-fitted logistic
    # head (linear_probe.py); it reads model, data, probe, augment (views > 1) and engine.seed only.
    # lp_ft: a linear probe on the training rows, then the supervised loop from its weights.
    strategy: str = "finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the offending key; return self for chaining."""
        self.data.labels = list(validate_label_names(self.data.labels))
        checks = [
            ("strategy", self.strategy in ("finetune", "linear_probe", "lp_ft"),
             "must be one of finetune, linear_probe, lp_ft"),
            ("probe.c_grid", len(self.probe.c_grid) > 0 and all(c > 0 for c in self.probe.c_grid),
             "must be a non-empty list of positive numbers"),
            ("probe.cv_folds", self.probe.cv_folds >= 2, "must be >= 2"),
            ("probe.views", self.probe.views >= 1, "must be >= 1"),
            ("loss.kind", self.loss.kind in ("bce", "weighted_bce", "focal", "asl"),
             "must be one of bce, weighted_bce, focal, asl"),
            ("engine.precision", self.engine.precision in ("auto", "bf16", "fp16", "fp32"),
             "must be one of auto, bf16, fp16, fp32"),
            ("eval.select", self.eval.select in ("mean_auroc_scored", "mean_auroc", "neg_val_loss"),
             "must be one of mean_auroc_scored, mean_auroc, neg_val_loss"),
            ("model.img_size", self.model.img_size > 0 and self.model.img_size % 16 == 0,
             "must be a positive multiple of 16"),
            ("model.attention", self.model.attention in ("auto", "sdpa", "explicit"),
             "must be one of auto, sdpa, explicit"),
            ("model.pos_embed", self.model.pos_embed in ("random", "sincos"), "must be one of random, sincos"),
            ("schedule.epochs", self.schedule.epochs >= 1, "must be >= 1"),
            ("schedule.grad_accum", self.schedule.grad_accum >= 1, "must be >= 1"),
            ("schedule.batch_size", self.schedule.batch_size % self.schedule.grad_accum == 0,
             "must be divisible by schedule.grad_accum"),
            ("data.val_fraction", 0.0 < self.data.val_fraction < 1.0, "must be in (0, 1)"),
            ("augment.scale", len(self.augment.scale) == 2 and 0 < self.augment.scale[0] <= self.augment.scale[1] <= 1,
             "must be [min, max] with 0 < min <= max <= 1"),
            ("optim.layer_decay", 0 < self.optim.layer_decay <= 1, "must be in (0, 1]"),
            ("ema.decay", 0 <= self.ema.decay < 1, "must be in [0, 1)"),
        ]
        check_all(self, checks, "config")
        return self

    @property
    def scored_labels(self) -> list[str]:
        return [name for name in SCORED_TARGETS if name in self.data.labels]


# -- dict <-> dataclass --------------------------------------------------------------------------

def config_to_dict(cfg: TrainConfig) -> dict:
    """A plain dict (str, int, float, bool, lists) safe for YAML and ``torch.load(weights_only=True)``."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict, *, source: str = "config") -> TrainConfig:
    return build_dataclass(TrainConfig, d, prefix="", source=source).validate()


def build_dataclass(cls, d: dict, prefix: str, source: str):
    """Build dataclass ``cls`` from a nested dict, type-checking values; unknown keys name ``source``."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: section {prefix.rstrip('.') or '<root>'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ValueError(f"{source}: unknown config key {prefix + key!r}; "
                             f"known keys here: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value or {}, prefix + key + ".", source)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, source)
    return cls(**kwargs)


def _coerce(value: Any, hint, key: str, source: str):
    """Check/convert a YAML value to the field's type (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, key, source) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{source}: {key} must be {hint.__name__}, got {value!r}")


def check_all(cfg, checks: list[tuple[str, bool, str]], what: str) -> None:
    """The validation shape training and pre-training configs share: ``(key, ok, why)`` rows, the first
    failing one raised as ``ValueError("<what> <key>=<value>: <why>")`` (the value when ``key`` names a field)."""
    for key, ok, why in checks:
        if not ok:
            try:
                shown = f"{key}={_get(cfg, key)!r}"
            except AttributeError:  # a check over several fields, named in words
                shown = key
            raise ValueError(f"{what} {shown}: {why}")


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# -- recipes and overrides -----------------------------------------------------------------------

RECIPES = ("baseline", "improved")


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe name (``baseline``, ``improved``) or a path to a YAML file."""
    if str(name_or_path) in RECIPES:
        return Path(str(resources.files("cxrvit.training") / "recipes" / f"{name_or_path}.yaml"))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(name_or_path)!r} is neither a shipped recipe "
                                f"({', '.join(RECIPES)}) nor an existing YAML file")
    return path


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML: ``3e-4``, ``true``, ``[0.6, 1]``)."""
    d = _deepcopy(d)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _looks_numeric(raw):
            value = float(raw)  # YAML 1.1 reads "3e-4" as a string
        parts = dotted.strip().split(".")
        node = d
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return d


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a recipe by name or path, apply ``--set`` overrides, validate, return the config."""
    path = recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, source=str(path) + (" + --set" if overrides else ""))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
