"""Typed training configuration: nested dataclasses, YAML recipes and ``key=value`` overrides.

A recipe is a YAML file whose sections mirror :class:`TrainConfig`. Every key must be known:
a typo in a recipe or in ``--set`` is an error that names the key, never a silently ignored
setting. A recipe also holds only what its strategy reads (:data:`UNREAD`): the fine-tuning
sections under a frozen-backbone probe, or the probe's section under fine-tuning, are an error
that names the key and the strategy. The resolved config is written to ``RUN/config.yaml`` and
stored in every checkpoint as a plain dict (:func:`config_to_dict`), so a run can always say
exactly how it was trained; such saved configs hold every section and load as they are
(:func:`config_from_dict` checks values, not what a strategy reads).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from cxrvit.labels import DEFAULT_LABELS, SCORED_TARGETS, validate_label_names
from cxrvit.model.vit import ARCHITECTURES, GLOBAL_POOLS
from cxrvit.training.configparse import (apply_overrides, build_config, check_all, copy_nested, dotted_keys, merge,
                                         load_yaml, optimizer_checks, parse_override)


@dataclass
class ModelConfig:
    arch: str = "vit_small"          # a name from cxrvit.model.vit.ARCHITECTURES
    img_size: int = 224              # training/inference resolution (multiple of the patch size)
    drop_path: float = 0.0           # stochastic depth rate of the last block (linear in depth)
    attention: str = "auto"          # auto | sdpa | explicit (auto: per device and dtype, cxrvit.runtime)
    pos_embed: str = "random"        # start of pos_embed: random (DINO) | sincos (MAE's table); --init overrides
    global_pool: str = "token"       # the head reads: token (CLS, DINO) | avg (mean of patch tokens, MAE's) |
                                     # avgmax (patch mean and max) | token+avg (CLS and patch mean); model.vit
    n_last_blocks: int = 1           # the head reads the last n blocks' normed outputs, each pooled, side by side
                                     # (DINO's linear evaluation: 4); the head's width is n x 384 (2n x when paired)
    init: str = ""                   # backbone file the recipe starts from ("" = pos_embed's start); --init, an
                                     # arm's init or pre-training stage replace it; relative = from the cwd


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
    deterministic: bool = True       # torch.use_deterministic_algorithms where it does not fail
    log_every: int = 10


@dataclass
class ProbeConfig:
    """The probe strategy's head (``linear_probe``, and LP-FT's first stage: cxrvit.training.linear_probe)."""
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])   # inverse L2 strengths tried
    cv_folds: int = 5                # patient folds for choosing C and cross-fitting the thresholds
    views: int = 1                   # feature views per training image: 1 plain + (views - 1) augmented


@dataclass
class TrainConfig:
    name: str = "custom"
    # finetune: the supervised loop (engine.py). linear_probe: frozen backbone + cross-fitted logistic
    # head (linear_probe.py). lp_ft: a linear probe on the training rows, then the supervised loop from
    # its weights. What each one does not read: UNREAD below.
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
        """Raise ``ValueError`` naming the offending key; return self for chaining.

        Rows are evaluated before any is checked, so a row that divides or indexes guards itself (a zero
        ``grad_accum`` must be reported by its own row, not crash the one after it)."""
        self.data.labels = list(validate_label_names(self.data.labels))
        o, a, s = self.optim, self.augment, self.schedule
        checks = [
            ("data.labels", len(self.data.labels) >= 1, "must name at least one label"),
            ("strategy", self.strategy in ("finetune", "linear_probe", "lp_ft"),
             "must be one of finetune, linear_probe, lp_ft"),
            ("probe.c_grid", len(self.probe.c_grid) > 0 and all(c > 0 for c in self.probe.c_grid),
             "must be a non-empty list of positive numbers"),
            ("probe.cv_folds", self.probe.cv_folds >= 2, "must be >= 2"),
            ("probe.views", self.probe.views >= 1, "must be >= 1"),
            ("loss.kind", self.loss.kind in ("bce", "weighted_bce", "focal", "asl"),
             "must be one of bce, weighted_bce, focal, asl"),
            ("loss.alpha", self.loss.alpha <= 1, "must be in [0, 1] (focal's weight of positives), or < 0 for off"),
            ("engine.precision", self.engine.precision in ("auto", "bf16", "fp16", "fp32"),
             "must be one of auto, bf16, fp16, fp32"),
            ("eval.select", self.eval.select in ("mean_auroc_scored", "mean_auroc", "neg_val_loss"),
             "must be one of mean_auroc_scored, mean_auroc, neg_val_loss"),
            ("model.arch", self.model.arch in ARCHITECTURES, f"must be one of {', '.join(sorted(ARCHITECTURES))}"),
            ("model.img_size", self.model.img_size > 0 and self.model.img_size % 16 == 0,
             "must be a positive multiple of 16"),
            ("model.attention", self.model.attention in ("auto", "sdpa", "explicit"),
             "must be one of auto, sdpa, explicit"),
            ("model.pos_embed", self.model.pos_embed in ("random", "sincos"), "must be one of random, sincos"),
            ("model.global_pool", self.model.global_pool in GLOBAL_POOLS, f"must be one of {', '.join(GLOBAL_POOLS)}"),
            ("model.n_last_blocks", 1 <= self.model.n_last_blocks <= 12, "must be in 1..12 (ViT-S/16 has 12 blocks)"),
            ("schedule.epochs", self.schedule.epochs >= 1, "must be >= 1"),
            ("schedule.batch_size", s.batch_size >= 1, "must be >= 1"),
            ("schedule.grad_accum", s.grad_accum >= 1, "must be >= 1"),
            ("schedule.batch_size", s.grad_accum >= 1 and s.batch_size % s.grad_accum == 0,
             "must be divisible by schedule.grad_accum"),
            ("eval.batch_size", self.eval.batch_size >= 1, "must be >= 1"),
            ("engine.log_every", self.engine.log_every >= 1, "must be >= 1 (optimizer steps between train records)"),
            ("engine.checkpoint_every", self.engine.checkpoint_every >= 0, "must be >= 0 (0 = epoch ends only)"),
            ("model.drop_path", 0 <= self.model.drop_path < 1, "must be in [0, 1)"),
            ("data.val_fraction", 0.0 < self.data.val_fraction < 1.0, "must be in (0, 1)"),
            ("augment.scale", len(self.augment.scale) == 2 and 0 < self.augment.scale[0] <= self.augment.scale[1] <= 1,
             "must be [min, max] with 0 < min <= max <= 1"),
            ("augment.ratio", len(a.ratio) == 2 and 0 < a.ratio[0] <= a.ratio[1],
             "must be [min, max] aspect ratios with 0 < min <= max"),
            ("augment.hflip", 0 <= a.hflip <= 1, "must be a probability in [0, 1]"),
            ("augment.mix_prob", 0 <= a.mix_prob <= 1, "must be a probability in [0, 1]"),
            ("optim.layer_decay", 0 < self.optim.layer_decay <= 1, "must be in (0, 1]"),
            ("ema.decay", 0 <= self.ema.decay < 1, "must be in [0, 1)"),
        ] + optimizer_checks(o)
        check_all(self, checks, "config")
        return self

    @property
    def scored_labels(self) -> list[str]:
        return [name for name in SCORED_TARGETS if name in self.data.labels]


# -- dict <-> dataclass --------------------------------------------------------------------------

def config_to_dict(cfg: TrainConfig) -> dict:
    """A plain dict (str, int, float, bool, lists) safe for YAML and ``torch.load(weights_only=True)``."""
    return dataclasses.asdict(cfg)


#: Keys that configs saved by earlier versions hold but nothing reads any more (``engine.workers``: loader
#: threads, never wired up), with the value every saved config held (the legacy fold hash puts it back,
#: cxrvit.experiments.identity). A saved config drops them on load; a recipe or ``--set`` naming one is an error.
REMOVED_KEYS = {"engine.workers": 0}


def config_from_dict(d: dict, *, source: str = "config") -> TrainConfig:
    """A saved config (``config.yaml``, a checkpoint's or a bundle's) -> :class:`TrainConfig`.

    Saved configs hold every section whatever the strategy, so this checks values only; what a
    user asks for is checked against the strategy by :func:`load_recipe`.
    """
    d = copy_nested(d)
    for dotted in REMOVED_KEYS:
        section, leaf = dotted.split(".")
        if isinstance(d.get(section), dict):
            d[section].pop(leaf, None)
    return build_config(TrainConfig, d, source)


# -- recipes and overrides -----------------------------------------------------------------------

#: Shipped recipes (``training/recipes/NAME.yaml``). ``improved`` is the product: a recipe file that names
#: its ``base`` (``probe-random``) plus the learned backbone it starts from (``model.init``) and its read-out.
RECIPES = ("baseline", "improved", "probe-random", "finetune")

_PROBE_HAS_NO = "a frozen backbone with a logistic head has no optimiser, loss, schedule or EMA"
#: What each strategy does not read, as ``{section or section.key: why}``. Given in a recipe or by ``--set``
#: under that strategy it is an error naming the key and the strategy: a setting that would be silently
#: ignored is a recipe that says more than it does. lp_ft runs both parts, so it reads everything.
UNREAD: dict[str, dict[str, str]] = {
    "finetune": {"probe": "only strategy linear_probe or lp_ft fits a probe"},
    "linear_probe": {
        "optim": _PROBE_HAS_NO, "loss": _PROBE_HAS_NO, "schedule": _PROBE_HAS_NO, "ema": _PROBE_HAS_NO,
        "model.drop_path": "the backbone is frozen, and stochastic depth acts only while training it",
        **dict.fromkeys(("augment.mixup", "augment.cutmix", "augment.mix_prob"),
                        "batch mixing belongs to the training loop; the probe's extra views are single images"),
        "eval.select": "the probe chooses its C by cross-fitting, not by a validation metric",
        "eval.tta": "the probe's bundle scores the plain image",
        "engine.checkpoint_every": "the probe has no optimizer steps to checkpoint",
        "engine.compile": "the probe's features come from an uncompiled scoring pass",
        "engine.precision": "the probe's features come from the fp32 scoring pass (runtime.inference_precision)",
        "engine.deterministic": "the probe runs no training kernels to make deterministic",
        "engine.log_every": "the probe logs once per fitted C, not per optimizer step",
    },
    "lp_ft": {},
}


#: What ``cxrvit train --resume RUN --set KEY=...`` may change, per strategy: a probe's head settings, because its
#: feature pass (most of its cost, kept in ``RUN/features.npz``) does not depend on them. Anything else would make the
#: resumed run another run than its folder records.
FREE_ON_RESUME = {"linear_probe": ("probe.c_grid", "probe.cv_folds")}


def unread_keys(strategy: str, given: list[str]) -> list[tuple[str, str]]:
    """``[(key, why)]`` for the dotted keys in ``given`` that ``strategy`` does not read."""
    unread = UNREAD.get(strategy, {})
    hits = []
    for key in given:
        if any(key.startswith(hit + ".") for hit, _ in hits):
            continue   # a section already named covers its keys
        for entry, why in unread.items():
            if key == entry or key.startswith(entry + "."):
                hits.append((key, why))
                break
    return hits


def drop_unread(d: dict, strategy: str) -> dict:
    """``d`` (a config as a nested dict, possibly partial) less what ``strategy`` does not read, in place."""
    for entry in UNREAD.get(strategy, {}):
        *parents, leaf = entry.split(".")
        node = d
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return d


def read_by_strategy(cfg: TrainConfig) -> dict:
    """``config_to_dict(cfg)`` less what ``cfg.strategy`` does not read: two configs equal here train the same."""
    return drop_unread(config_to_dict(cfg), cfg.strategy)


def recipe_path(name_or_path: str | Path, *, relative_to: Path | None = None) -> Path:
    """A shipped recipe name (:data:`RECIPES`) or a path to a YAML file (``relative_to`` a recipe's folder)."""
    if str(name_or_path) in RECIPES:
        return Path(str(resources.files("cxrvit.training") / "recipes" / f"{name_or_path}.yaml"))
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(name_or_path)!r} is neither a shipped recipe "
                                f"({', '.join(RECIPES)}) nor an existing YAML file")
    return path


def read_recipe(recipe: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[list[Path], dict]:
    """The recipe's files (it, then its ``base`` chain) and its raw dict, each base merged underneath."""
    path = recipe_path(recipe)
    try:
        raw = load_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # the codec's own message names no file
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return [path], raw
    if path.resolve() in _seen or len(_seen) > 8:
        raise ValueError(f"{path}: base recipes form a loop ({' -> '.join(str(p) for p in _seen)})")
    base_file = str(base) if str(base) in RECIPES else recipe_path(str(base), relative_to=path.parent)
    files, below = read_recipe(base_file, _seen + (path.resolve(),))
    return [path, *files], merge(below, raw)


def load_recipe(recipe: str | Path, overrides: list[str] | None = None, *,
                shared: list[str] | None = None) -> TrainConfig:
    """Load a recipe by name or path, apply ``--set`` overrides, validate, return the config.

    A key the resolved strategy does not read (:data:`UNREAD`), in the recipe or in ``overrides``, is an
    error naming it. ``shared`` overrides are settings meant for several recipes at once (an arms plan's,
    a cross-validation comparison's): they apply first, and one this recipe's strategy does not read is
    left out for it instead of refused (``schedule.epochs`` shared by a fine-tune and a probe arm).
    """
    files, raw = read_recipe(recipe)
    path = files[0]
    overrides, shared = list(overrides or []), list(shared or [])
    strategy = apply_overrides(raw, shared + overrides).get("strategy", TrainConfig.strategy)
    shared = [item for item in shared if not unread_keys(str(strategy), [parse_override(item)[0]])]
    source = str(path) + (" + --set" if overrides or shared else "")
    hits = unread_keys(str(strategy), dotted_keys(raw))
    if hits:
        named = str(path) + "".join(f" (base {f})" for f in files[1:])
        raise ValueError(f"{named}: {_unread_message(hits, strategy)}; remove it from the recipe, or use a recipe "
                         f"written for that strategy ({', '.join(RECIPES)})")
    hits = unread_keys(str(strategy), [parse_override(item)[0] for item in overrides])
    if hits:
        raise ValueError(f"{source}: --set {_unread_message(hits, strategy, '=...')}")
    resolved = apply_overrides(raw, shared + overrides)
    resolved.setdefault("name", path.stem)
    return build_config(TrainConfig, resolved, source)


def _unread_message(hits: list[tuple[str, str]], strategy, suffix: str = "") -> str:
    keys = ", ".join(key + suffix for key, _ in hits)
    whys = "; ".join(dict.fromkeys(why for _, why in hits))
    return f"{keys} {'is' if len(hits) == 1 else 'are'} not read by strategy {strategy} ({whys})"


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
