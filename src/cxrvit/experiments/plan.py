"""An arms plan: the arms file (``bench/arms/*.yaml``) read, checked and resolved.

An *arm* is a training recipe, its ``--set`` overrides, and where its backbone starts: random
init, a checkpoint file (``init``), or a self-supervised pre-training stage (``pretrain``) run per
fold on that fold's training images. :func:`arm_identity` and :func:`pretrain_identity` say what an
arm or a stage *is* (its resolved config, defaults left out: ``identity.py``), which decides whether
a finished one may be reused.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cxrvit.data.cache import sha256_file
from cxrvit.experiments.identity import config_identity
from cxrvit.ssl.config import load_pretrain_recipe
from cxrvit.training.config import load_recipe, unread_keys
from cxrvit.training.configparse import get_dotted, load_yaml


@dataclass
class PretrainSpec:
    method: str                                       # dino | mae | ijepa
    recipe: str | None = None                         # default: the method's shipped recipe
    overrides: list[str] = field(default_factory=list)
    extra_data: list[str] = field(default_factory=list)   # other caches (never the scored images)
    train_fraction: float = 1.0                       # share of each fold's training patients it sees
    # Pre-train once per fold *and seed* (engine.seed + seed; seed 0 is the stage as it would run alone), so
    # the seeds of an arm reading it vary the backbone too: without it every seed reads one backbone per fold.
    per_seed: bool = False
    # Continued pre-training: start from another stage's result (its ``last.pt`` in the same fold and, if that
    # stage is ``per_seed``, the same seed); this stage's ``schedule.epochs`` are the epochs added.
    init_from: str | None = None


@dataclass
class Arm:
    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    init: str | None = None                           # a backbone file every fold starts from
    pretrain: str | None = None                       # name of a PretrainSpec run per fold
    # Data scaling: train on this share of each fold's training patients (nested: the quarter lies
    # inside the half), scored on the same held-out patients as every other arm.
    train_fraction: float = 1.0


#: ``protocol:`` values: ``auto`` is the official split above ~20k images (experiments.crossval.choose_protocol).
PROTOCOLS = ("auto", "cv", "official")


@dataclass
class ArmsPlan:
    arms: list[Arm]
    reference: str = "baseline"
    overrides: list[str] = field(default_factory=list)    # applied to every arm, before its own
    pretrain: dict[str, PretrainSpec] = field(default_factory=dict)
    protocol: str = "cv"                                  # cv | official | auto (official above ~20k images)
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    fold_seed: int = 0
    # Run and score only these folds of the k-fold plan (default: all). [0] with folds: 2 is a
    # patient-wise 50/50 hold-out; the other folds can be added later into the same OUT.
    run_folds: list[int] | None = None

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ValueError(f"no arm named {name!r}; the plan has {[a.name for a in self.arms]}")


def load_plan(path: str | os.PathLike) -> ArmsPlan:
    """Read an arms YAML file; every mistake is named with the file."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the arms file: {exc}") from exc
    known = {f for f in ArmsPlan.__dataclass_fields__}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: an arms file is a mapping of {sorted(known)}, got {type(raw).__name__}")
    if not isinstance(raw.get("pretrain") or {}, dict):
        raise ValueError(f"{path}: 'pretrain' must map stage names to their settings, got {raw['pretrain']!r}")
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    try:
        arms = [Arm(**a) for a in raw.get("arms") or []]
        pre = {k: PretrainSpec(**v) for k, v in (raw.get("pretrain") or {}).items()}
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    plan = ArmsPlan(arms=arms, pretrain=pre, **{k: v for k, v in raw.items() if k not in ("arms", "pretrain")})
    return check_plan(plan, str(path))


def check_plan(plan: ArmsPlan, source: str) -> ArmsPlan:
    _check_types(plan, source)
    names = [a.name for a in plan.arms]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"{source}: needs at least two arms with distinct names, got {names}")
    if plan.reference not in names:
        raise ValueError(f"{source}: reference arm {plan.reference!r} is not among the arms {names}")
    for name, spec in plan.pretrain.items():
        if not isinstance(spec.per_seed, bool):
            raise ValueError(f"{source}: pre-training {name!r}: per_seed must be true or false, got {spec.per_seed!r}")
        if "-seed" in name or "/" in name:
            raise ValueError(f"{source}: pre-training name {name!r} may not contain '/' or '-seed'")
        if not _is_share(spec.train_fraction):
            raise ValueError(f"{source}: pre-training {name!r}: train_fraction must be a number in (0, 1], "
                             f"got {spec.train_fraction!r}")
        _check_init_from(plan, name, source)
    for a in plan.arms:
        if a.pretrain and a.pretrain not in plan.pretrain:
            raise ValueError(f"{source}: arm {a.name!r} names pre-training {a.pretrain!r}, which is not defined "
                             f"under 'pretrain:' ({sorted(plan.pretrain)})")
        if a.pretrain and a.init:
            raise ValueError(f"{source}: arm {a.name!r} has both 'init' and 'pretrain'; choose one")
        if a.init and not Path(a.init).exists():
            raise ValueError(f"{source}: arm {a.name!r}: init checkpoint {a.init} does not exist")
        if not _is_share(a.train_fraction):
            raise ValueError(f"{source}: arm {a.name!r}: train_fraction must be a number in (0, 1], "
                             f"got {a.train_fraction!r}")
        # A stage may see more of the fold's training patients than the arm has labels for (label scaling:
        # unlabelled images are what pre-training is for; the shares are nested, so the arm's patients are among
        # the stage's and the held-out ones in neither), never fewer (the head would train on images the
        # backbone was kept from, which no share of the data describes).
        if a.pretrain and plan.pretrain[a.pretrain].train_fraction < a.train_fraction:
            raise ValueError(f"{source}: arm {a.name!r} trains on {a.train_fraction:g} of each fold's patients but "
                             f"its pre-training {a.pretrain!r} sees only {plan.pretrain[a.pretrain].train_fraction:g}; "
                             "a stage must see at least the arm's share (the same share for data scaling, more "
                             "for label scaling)")
        if "-seed" in a.name or "/" in a.name:
            raise ValueError(f"{source}: arm name {a.name!r} may not contain '/' or '-seed'")
    _check_seeds(plan.seeds, source)
    _check_folds(plan, source)
    return plan


def _check_folds(plan: ArmsPlan, source: str) -> None:
    """What the file alone decides about its folds, named with the file (the harness checks the rest, e.g. that a
    cache has the patients for k folds, when it plans them)."""
    if plan.protocol not in PROTOCOLS:
        raise ValueError(f"{source}: unknown protocol {plan.protocol!r}; choose {', '.join(PROTOCOLS)}")
    if plan.protocol != "official" and plan.folds < 2:
        raise ValueError(f"{source}: 'folds' must be at least 2 for a cross-validation, got {plan.folds}")
    if plan.run_folds is not None:
        top = plan.folds if plan.protocol == "cv" else None   # auto may become the official split's one fold
        if (not plan.run_folds or len(set(plan.run_folds)) != len(plan.run_folds)
                or any(i < 0 or (top is not None and i >= top) for i in plan.run_folds)):
            where = f" in 0..{top - 1}" if top is not None else ""
            raise ValueError(f"{source}: run_folds {plan.run_folds} must be distinct fold numbers{where}")


def _check_seeds(seeds, source: str) -> None:
    """A list of distinct non-negative integers: each seed is a folder and a training of every arm, so a repeated
    one would run and stack the same folds twice (and then fail, late, as folds that do not partition the cache)."""
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{source}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad:
        raise ValueError(f"{source}: 'seeds' must be non-negative integers; {bad!r} are not")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"{source}: 'seeds' repeats {repeated} ({seeds}); each seed may appear once")


def _check_types(plan: ArmsPlan, source: str) -> None:
    """The values the harness computes with have their types, so that a wrong one is named here with the file,
    not met later as a Python TypeError."""
    def overrides(value, where: str) -> None:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{source}: {where}overrides must be a list of 'key=value' strings, got {value!r}")

    overrides(plan.overrides, "")
    for a in plan.arms:
        if not isinstance(a.name, str) or not a.name or not isinstance(a.recipe, str):
            raise ValueError(f"{source}: arm {a.name!r}: name and recipe must be text, got recipe {a.recipe!r}")
        if a.init is not None and not isinstance(a.init, str):
            raise ValueError(f"{source}: arm {a.name!r}: init must be a file path, got {a.init!r}")
        overrides(a.overrides, f"arm {a.name!r}: ")
    for name, spec in plan.pretrain.items():
        if not isinstance(spec.method, str) or not isinstance(spec.recipe, (str, type(None))):
            raise ValueError(f"{source}: pre-training {name!r}: method and recipe must be text, got method "
                             f"{spec.method!r}, recipe {spec.recipe!r}")
        overrides(spec.overrides, f"pre-training {name!r}: ")
    if not _is_int(plan.folds):  # its range is the cross-validation's to check (the official protocol has none)
        raise ValueError(f"{source}: 'folds' must be an integer, got {plan.folds!r}")
    if not _is_int(plan.fold_seed):
        raise ValueError(f"{source}: 'fold_seed' must be an integer, got {plan.fold_seed!r}")
    if plan.run_folds is not None and not (isinstance(plan.run_folds, list) and all(map(_is_int, plan.run_folds))):
        raise ValueError(f"{source}: 'run_folds' must be a list of fold numbers, got {plan.run_folds!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_init_from(plan: ArmsPlan, name: str, source: str) -> None:
    """A stage continued from another: that stage exists, sees the same images, and no chain loops."""
    seen, here = [name], plan.pretrain[name]
    while here.init_from is not None:
        parent = here.init_from
        if not isinstance(parent, str) or parent not in plan.pretrain:
            raise ValueError(f"{source}: pre-training {seen[-1]!r} continues {parent!r}, which is not defined "
                             f"under 'pretrain:' ({sorted(plan.pretrain)})")
        if parent in seen:
            raise ValueError(f"{source}: pre-training {name!r}: init_from loops ({' -> '.join(seen + [parent])})")
        if (plan.pretrain[parent].method, plan.pretrain[parent].train_fraction) != (here.method, here.train_fraction):
            raise ValueError(f"{source}: pre-training {seen[-1]!r} continues {parent!r}, which has another method "
                             "or train_fraction; a continued stage must see the same images with the same method")
        seen.append(parent)
        here = plan.pretrain[parent]


def _is_share(value) -> bool:
    """A training share: a real number in (0, 1] (YAML's ``true`` is not one, nor the string "1/4")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0


def arm_config(plan: ArmsPlan, arm: Arm, seed: int):
    return load_recipe(arm.recipe, overrides=list(arm.overrides) + [f"engine.seed={seed}"], shared=list(plan.overrides))


def pretrain_config(spec: PretrainSpec, device: str | None = None, seed: int = 0):
    """The stage's config; for a ``per_seed`` stage and plan seed ``seed`` > 0, its engine seed moved by ``seed``."""
    overrides = list(spec.overrides) + ([f"engine.device={device}"] if device else [])
    cfg = load_pretrain_recipe(spec.recipe or spec.method, overrides, method=spec.method)
    if spec.per_seed and seed:
        cfg = load_pretrain_recipe(spec.recipe or spec.method, overrides + [f"engine.seed={cfg.engine.seed + seed}"],
                                   method=spec.method)
    return cfg


def pretrain_dir(out: Path, fold: int, name: str, spec: PretrainSpec, seed: int) -> Path:
    """Where fold ``fold``'s stage ``name`` runs for plan seed ``seed`` (one folder per fold unless ``per_seed``)."""
    return Path(out) / f"fold{fold}" / (f"pretrain-{name}" if seed == 0 or not spec.per_seed
                                         else f"pretrain-{name}-seed{seed}")


def pretrain_dirs(out: Path, plan: ArmsPlan, name: str, folds) -> list[Path]:
    """Every folder stage ``name`` runs in over ``folds`` and the plan's seeds."""
    spec = plan.pretrain[name]
    return list(dict.fromkeys(pretrain_dir(out, f, name, spec, s) for f in folds for s in plan.seeds))


def arm_dir(out: Path, fold: int, arm: Arm, seed: int) -> Path:
    return out / f"fold{fold}" / (arm.name if seed == 0 else f"{arm.name}-seed{seed}")


def arm_identity(plan: ArmsPlan, arm: Arm) -> dict:
    """What the arm trains, whatever the text that says it. Seed 0 stands for every seed: the seeds'
    runs differ only in ``engine.seed``, which each fold's ``heldout.npz`` hash covers."""
    ident = {"config": config_identity(arm_config(plan, arm, seed=0))}
    if arm.init:
        ident["init"] = str(arm.init)
        ident["init_sha256"] = init_sha256(arm.init)  # the file's content: other weights at the same path differ
    if arm.pretrain:
        ident["pretrain"] = arm.pretrain        # the stage's own identity is checked by its name
    if arm.train_fraction != 1.0:               # left out at its default, like every config field
        ident["train_fraction"] = arm.train_fraction
    return ident


_SHA256: dict = {}


def init_sha256(path) -> str:
    """sha256 of an ``init`` file, computed once per (path, size, mtime) in a process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = sha256_file(Path(path))
    return _SHA256[key]


def fold_pins(arm: Arm) -> dict:
    """What each fold's ``heldout.npz`` is pinned to besides its config hash: the share of patients the arm trained
    on, its pre-training stage and its ``init`` file's content (a folder copied under another arm's name is refused)."""
    return {"train_fraction": float(arm.train_fraction), "pretrain": arm.pretrain or "",
            "init_sha256": init_sha256(arm.init) if arm.init else ""}


def scaling_key(plan: ArmsPlan, arm: Arm, label_curve: bool = False) -> str:
    """What an arm is apart from how much data it saw: arms with equal keys form one data-scaling
    curve (the pre-training stage counts by its method and config, not by its name).

    An arm whose stage sees more patients than it has labels for is on a *label-scaling* curve instead (the
    stage's share fixed, the labels' varying), keyed with that share; ``label_curve`` gives the key of the
    label-scaling curve an arm with equal shares ends (see :func:`cxrvit.experiments.arms_table.scaling_curves`)."""
    ident = {k: v for k, v in arm_identity(plan, arm).items() if k not in ("train_fraction", "pretrain")}
    if arm.pretrain:
        spec = plan.pretrain[arm.pretrain]
        ident["pretrain"] = {k: v for k, v in pretrain_identity(spec).items() if k != "train_fraction"}
        if label_curve or spec.train_fraction != arm.train_fraction:
            ident["pretrain"]["fixed_share"] = spec.train_fraction
    return yaml.safe_dump(ident, sort_keys=True)


def fraction_seed(plan: ArmsPlan, fold: int) -> int:
    """One patient order per fold, shared by every arm and fraction, so subsets are nested and paired."""
    return 1000 * plan.fold_seed + fold


def pretrain_identity(spec: PretrainSpec) -> dict:
    ident = {"config": config_identity(pretrain_config(spec))}
    if spec.extra_data:
        ident["extra_data"] = [str(p) for p in spec.extra_data]
    if spec.train_fraction != 1.0:
        ident["train_fraction"] = spec.train_fraction
    if spec.per_seed:                           # left out at its default: earlier stages keep their identity
        ident["per_seed"] = True
    if spec.init_from:                          # the stage it continues is checked by its own name
        ident["init_from"] = spec.init_from
    return ident


def with_default_init(plan: ArmsPlan, init: str | None) -> ArmsPlan:
    """Every arm without its own ``init`` or ``pretrain`` starts from ``init`` (e.g. DINO's published
    ImageNet ViT-S/16, ``dino_deitsmall16_pretrain.pth``, which cxrvit cannot download for you)."""
    if not init:
        return plan
    if not Path(init).exists():
        raise ValueError(f"--init {init}: no such file")
    arms = [a if (a.init or a.pretrain) else Arm(**{**asdict(a), "init": str(init)}) for a in plan.arms]
    return ArmsPlan(**{**asdict(plan), "arms": arms, "pretrain": plan.pretrain})


def check_starts(plan: ArmsPlan) -> ArmsPlan:
    """Every arm states where its backbone starts. A recipe's own ``model.init`` (``improved``: the backbone the
    repository ships, pre-trained on the sample's train_val images) is refused in a comparison unless the arm
    says so: in patient folds of those images it would have seen the held-out half, unlabelled."""
    for a in plan.arms:
        if a.init or a.pretrain:
            continue
        cfg = arm_config(plan, a, seed=plan.seeds[0])
        if cfg.model.init and not any(o.split("=", 1)[0] == "model.init" for o in a.overrides):
            raise ValueError(
                f"arm {a.name!r}: recipe {a.recipe} starts from model.init={cfg.model.init}, a backbone pre-trained "
                f"outside this plan's folds; give the arm `pretrain: STAGE` (pre-trained inside each fold, e.g. "
                f"the product's: {{method: mae, recipe: mae224}}), `init: FILE`, or overrides [model.init=...] "
                f"to use a file knowingly (model.init= for the random start)")
    return plan


#: ``cxrvit bench recipes`` runs a recipe that starts from a shipped backbone end to end: the backbone is
#: pre-trained inside each fold by the stage that made it, instead of read from the file.
SHIPPED_BACKBONE_STAGES = {"improved": ("mae224", PretrainSpec(method="mae", recipe="mae224"))}

# A two-recipe comparison (``cxrvit bench recipes``) is only fair when these agree.
SHARED_KEYS = ("schedule.epochs", "model.img_size", "model.arch")


def recipes_plan(recipes, overrides=(), *, protocol: str = "auto", folds: int = 5, seed: int = 0,
                 init: str | None = None) -> ArmsPlan:
    """``cxrvit bench recipes A B`` as an arms plan: two arms named after the recipes, A the reference,
    one seed; ``seed`` assigns the folds. Refuses recipes that differ in a :data:`SHARED_KEYS` value."""
    recipes = list(recipes)
    if len(recipes) != 2:
        raise ValueError(f"bench recipes compares exactly two recipes (A then B, difference B − A); got {recipes}")
    cfgs = {r: load_recipe(r, shared=list(overrides)) for r in recipes}
    for key in SHARED_KEYS:   # among the recipes whose strategy reads the key
        values = {r: get_dotted(c, key) for r, c in cfgs.items() if not unread_keys(c.strategy, [key])}
        if len(set(map(str, values.values()))) > 1:
            raise ValueError(f"recipes differ in {key} ({values}): a fair comparison needs the same value; "
                             f"set it for both with --set {key}=...")
    names = [Path(r).stem if str(r).endswith((".yaml", ".yml")) else str(r) for r in recipes]
    arms, stages = [], {}
    for n, r in zip(names, recipes):
        stage = None if init else SHIPPED_BACKBONE_STAGES.get(str(r)) if cfgs[r].model.init else None
        if stage:
            stages[stage[0]] = stage[1]
        arms.append(Arm(name=n, recipe=str(r), pretrain=stage[0] if stage else None))
    plan = ArmsPlan(arms=arms, reference=names[0], pretrain=stages, overrides=list(overrides), protocol=protocol,
                    folds=folds, seeds=[0], fold_seed=seed)
    return with_default_init(check_plan(plan, f"--recipes {' '.join(map(str, recipes))}"), init)
