"""Model bundles: everything needed to use a trained model, in one folder.

A bundle (a finished training run's folder, ``RUN/``) holds
- ``model.safetensors``: the chosen (best-on-validation) weights, DINO key layout, head of K labels;
- ``bundle.json``: ``arch``, ``img_size`` and ``patch_size`` (the stored position grid and the patch),
  ``global_pool`` (what the head reads), ``labels`` (K names, head order),
  ``thresholds`` (label -> float, tuned on held-out predictions: a validation split or cross-fitting),
  ``threshold_source`` (which split and images they were fitted on, and ``patients``: those images' patient
  IDs, so another cache can be checked too),
  ``preprocessing`` (:class:`~cxrvit.data.preprocess.Preprocessing` as a dict), ``config`` (the
  resolved training config) and ``val_patients_hash`` (so evaluation can refuse to score the
  images the thresholds were tuned on).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cxrvit.data.preprocess import Preprocessing
from cxrvit.fileio import atomic_write
from cxrvit.inference import scoring
from cxrvit.model.checkpoints import save_weights
from cxrvit.model.vit import ARCHITECTURES, VisionTransformer, build_model

WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
#: Keys of bundle.json that load_bundle cannot do without.
REQUIRED_META = ("labels", "thresholds", "preprocessing")
#: threshold_source key under which a bundle records its tuning images' patient IDs: scoring checks held-out
#: patients against it, so another cache holding other films of those patients is caught too.
TUNING_PATIENTS_KEY = "patients"


def tuning_source(split: str, images, patients, **details) -> dict:
    """``threshold_source`` for a bundle: the split its thresholds were tuned on, those images' names and
    their patients (distinct, sorted)."""
    return {"split": split, **details, "images": [str(i) for i in images],
            TUNING_PATIENTS_KEY: sorted({str(p) for p in patients})}


@dataclass
class Bundle:
    model: VisionTransformer
    labels: list[str]
    thresholds: dict[str, float]
    preprocessing: Preprocessing
    arch: str = "vit_small"
    threshold_source: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def tuned_with_tta(self) -> bool:
        """Whether the thresholds were tuned on test-time-augmented predictions."""
        return bool((self.meta.get("training") or {}).get("tta", False))

    @torch.no_grad()
    def predict_proba(self, grey: torch.Tensor, batch_size: int = 64, tta: bool | None = None) -> torch.Tensor:
        """``[N, 1, S, S]`` uint8 grey images -> ``[N, K]`` probabilities, through the one scoring pass
        (:func:`cxrvit.inference.scoring.predict_proba`, which the validation that tuned the thresholds
        also runs), with ``tta`` defaulting to how the bundle's thresholds were tuned. Float images must lie in
        [0, 1]. The pixels are scored as given: ``cxrvit predict``'s QC, which also turns a MONOCHROME1 file
        stored as MONOCHROME2 the right way up before scoring, is :func:`cxrvit.inference.predict.predict_files`."""
        if len(grey) == 0:
            return torch.zeros(0, len(self.labels))
        tta = self.tuned_with_tta if tta is None else tta
        return scoring.predict_proba(self.model, grey, self.preprocessing, tta, batch_size=batch_size)


def save_bundle(directory: os.PathLike | str, model: VisionTransformer, labels: list[str],
                thresholds: dict[str, float], preprocessing: Preprocessing, *, arch: str | None = None,
                threshold_source: dict | None = None, config: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``bundle.json`` atomically (temp file, then rename). ``arch``: the
    :data:`~cxrvit.model.vit.ARCHITECTURES` name; None reads it off the model's width and depth."""
    arch = arch or _arch_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_weights(state, directory / WEIGHTS_FILE, {"format": "pt", "arch": arch, "layout": "dino"})
    meta = {
        "format": "cxrvit-bundle/1",
        "arch": arch,
        # the stored position grid and the patch: a model built at another size than 224 (or patch 8) has another
        # pos_embed / patch filter shape, which load_bundle must rebuild (bundles before these keys: 224, 16)
        "img_size": int(model.patch_embed.img_size),
        "patch_size": int(model.patch_size),
        "global_pool": model.global_pool,   # what the head reads (model.vit.GLOBAL_POOLS); no weight says it
        "n_last_blocks": model.n_last_blocks,   # blocks the head reads (the head's width says it, the name does not)
        "labels": list(labels),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "threshold_source": threshold_source or {},
        "preprocessing": preprocessing.to_dict(),
        "config": config or {},
        **(extra or {}),
    }
    atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return directory


def _arch_of(model: VisionTransformer) -> str:
    for name, make in ARCHITECTURES.items():
        with torch.device("meta"):   # shapes only: no 22M-parameter initialisation
            ref = make()
        if (ref.embed_dim, len(ref.blocks), ref.blocks[0].attn.num_heads) == \
                (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads):
            return name
    raise ValueError(f"a ViT of width {model.embed_dim} and depth {len(model.blocks)} is none of "
                     f"{', '.join(sorted(ARCHITECTURES))}: a bundle could not be loaded again")


def load_bundle(directory: os.PathLike | str, device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle folder. A missing file raises FileNotFoundError; a file that is there but unreadable
    (truncated weights, bad JSON, a key missing) raises ValueError naming that file, which every command
    turns into a one-line error and exit code 2."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{directory}: not a cxrvit model bundle ({p.name} missing)")
    meta = read_meta(meta_path)
    labels = list(meta["labels"])
    # Built on the meta device: random initialisation of 22M parameters that the file overwrites
    # anyway was most of the load time; assign=True adopts the loaded tensors instead.
    with torch.device("meta"):
        try:
            model = build_model(meta.get("arch", "vit_small"), num_classes=len(labels),
                                img_size=int(meta.get("img_size", 224)), patch_size=int(meta.get("patch_size", 16)),
                                global_pool=meta.get("global_pool", "token"),   # bundles before it: the CLS token
                                n_last_blocks=int(meta.get("n_last_blocks", 1)))
        except ValueError as exc:   # an unknown arch or global_pool, or n_last_blocks beyond the depth
            raise ValueError(f"{meta_path}: {exc}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:   # truncated or not a safetensors file at all
        raise ValueError(f"{weights_path}: unreadable weights: {exc}") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:   # keys or shapes of another model than bundle.json describes
        raise ValueError(f"{weights_path}: weights do not fit the model {meta_path.name} describes: {exc}") from None
    model.to(device).eval()
    try:
        thresholds = {str(k): float(v) for k, v in meta["thresholds"].items()}
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{meta_path}: bad thresholds or preprocessing: {exc!r}") from None
    return Bundle(
        model=model,
        labels=labels,
        thresholds=thresholds,
        preprocessing=preprocessing,
        arch=meta.get("arch", "vit_small"),
        threshold_source=meta.get("threshold_source", {}),
        config=meta.get("config", {}),
        meta=meta,
    )


def read_meta(meta_path: Path) -> dict:
    """``bundle.json`` as a dict holding at least :data:`REQUIRED_META`, or ValueError naming the file."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing {', '.join(repr(k) for k in missing)} "
                         f"(a cxrvit bundle.json records {', '.join(REQUIRED_META)})")
    labels = meta["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(name, str) for name in labels):
        raise ValueError(f"{meta_path}: 'labels' must be a non-empty list of label names, found {labels!r}")
    return meta
