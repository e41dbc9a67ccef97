"""``cxrvit eval``: score a model bundle on a prepared cache, honestly.

Honesty rules this module enforces rather than documents:
- The operating thresholds are the bundle's, tuned on its validation images. Scoring any image
  whose *patient* contributed to that tuning raises :class:`ThresholdLeakError`, unless the caller
  asked for ``split="val"`` on purpose; the result is then flagged ``in_sample`` (optimistic F1).
- Every F1 is shown next to the trivial F1 of calling every image positive, and AUROC/AP/F1 carry
  patient-level bootstrap 95% intervals.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cxrvit.data.cache import CXRCache
from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, PatientBootstrap, estimates
from cxrvit.fileio import json_safe
from cxrvit.inference.bundle import META_FILE, TUNING_PATIENTS_KEY, load_bundle, read_meta
from cxrvit.labels import SCORED_TARGETS
from cxrvit.runtime import resolve_device

SPLITS = ("test", "val", "all")


class ThresholdLeakError(ValueError):
    """The images to be scored overlap (by patient) with those the thresholds were tuned on."""


# --------------------------------------------------------------------------- which images


def select_rows(cache, split: str, threshold_images=None, *, data: str = "cache") -> np.ndarray:
    """Row indices of ``cache`` for ``split``: ``test`` (NIH's official test list), ``val`` (the
    images the bundle's thresholds were tuned on) or ``all`` (every image, e.g. another dataset)."""
    index = cache.index
    if split == "all":
        return np.arange(len(index), dtype=np.int64)
    if split == "test":
        official = index["official_split"].fillna("").astype(str) if "official_split" in index else None
        if official is None or not (official == "test").any():
            raise ValueError(
                f"{data}: this cache has no images on NIH's official test list (official_split is empty), "
                "so --split test has nothing to score. Use --split all to score every image in a "
                "held-out cache (e.g. another dataset), or prepare the cache with the NIH split lists."
            )
        return np.flatnonzero((official == "test").to_numpy()).astype(np.int64)
    if split == "val":
        if not threshold_images:
            raise ValueError(f"{data}: --split val needs the bundle to record its validation images "
                             "(bundle.json threshold_source.images), and it does not")
        rows = np.flatnonzero(index["image"].astype(str).isin(set(map(str, threshold_images))).to_numpy())
        if len(rows) == 0:
            raise ValueError(f"{data}: none of the bundle's {len(threshold_images)} validation images are in this cache")
        return rows.astype(np.int64)
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def check_thresholds_held_out(threshold_source: dict, cache, rows: np.ndarray, *, allow_in_sample: bool = False,
                              allow_unverified: bool = False, run: str = "bundle") -> dict:
    """Refuse to score images that share a patient with the threshold-tuning images.

    The tuning patients are ``threshold_source.patients`` when the bundle records them (compared with the
    scored rows' patient IDs directly, so any cache can be checked); otherwise they are looked up from
    ``threshold_source.images`` in this cache, which only works for the images the cache holds: when some
    are not in it, the check cannot be complete and the provenance says ``verified: False`` and why.

    Returns a provenance dict for the report: where the thresholds came from, whether that could
    be verified, and whether the scored images are in-sample for them.
    """
    source = dict(threshold_source or {})
    where = source.get("split", "unknown")
    fitted, recorded_patients = source.get("images"), source.get(TUNING_PATIENTS_KEY)
    if fitted is None and recorded_patients is None:
        if not allow_unverified:
            raise ThresholdLeakError(
                f"{run}: bundle.json does not record which images its thresholds were tuned on "
                "(threshold_source.images), so cxrvit cannot show they are held out from the images being "
                "scored. Pass --allow-unverified-thresholds to score anyway; the report will say so."
            )
        return {"split": where, "verified": False, "in_sample": None, "tuning_images": None, "overlap_images": None,
                "reason": "the bundle does not record its tuning images"}
    fitted = set(map(str, fitted or ()))
    names = cache.index["image"].astype(str).to_numpy()
    patients = np.asarray(cache.patient_ids).astype(str)
    if recorded_patients is not None and not isinstance(recorded_patients, list):
        raise ValueError(f"{run}: bundle.json threshold_source.{TUNING_PATIENTS_KEY} must be a list of patient IDs, "
                         f"found {type(recorded_patients).__name__}")
    found = np.isin(names, list(fitted))
    tuning_patients = np.unique(patients[found])
    reason = None
    if recorded_patients is not None:
        tuning_patients = np.union1d(tuning_patients, np.asarray([str(p) for p in recorded_patients], dtype=str))
    else:
        n_absent = len(fitted - set(names[found]))
        if n_absent:
            # An absent tuning image's patient may still have other films in this cache: no overlap cannot be shown.
            reason = (f"{n_absent} of the {len(fitted)} tuning images are not in this cache and the bundle does not "
                      f"record their patients (threshold_source.{TUNING_PATIENTS_KEY}), so follow-up films of those "
                      "patients cannot be recognised")
    # Patient-level: a follow-up image of a tuning patient is not independent of the tuning set.
    leak = np.isin(names[rows], list(fitted)) | np.isin(patients[rows], tuning_patients)
    n_leak = int(leak.sum())
    if n_leak and not allow_in_sample:
        examples = ", ".join(names[rows][leak][:5])
        raise ThresholdLeakError(
            f"{run}: its thresholds were tuned on {where!r} images of {len(tuning_patients)} patients, and "
            f"{n_leak} of the {len(rows)} images to score belong to those patients (e.g. {examples}). "
            "Scoring them would report an optimistic F1. Score a held-out split (--split test, or another "
            "cache with --split all), or ask for --split val to score the tuning images knowingly."
        )
    # Unverified and no overlap found: whether the scored images are in-sample is unknown, not "no".
    in_sample = True if n_leak else (False if reason is None else None)
    provenance = {"split": where, "verified": reason is None, "in_sample": in_sample,
                  "tuning_images": len(fitted) if fitted else None, "overlap_images": n_leak}
    if reason:
        provenance["reason"] = reason
    return provenance


# --------------------------------------------------------------------------- predictions


@torch.no_grad()
def predict_rows(bundle, cache, rows: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Probabilities ``[len(rows), K]`` of ``bundle`` on cache rows, in the order of ``rows``.

    Through ``Bundle.predict_proba``, i.e. the one scoring pass (:mod:`cxrvit.inference.scoring`) that the
    validation which tuned the bundle's thresholds also ran (the whole square image resized to the model
    size, plus the centre-zoom view when the run used TTA): anything else would move the scores away
    from the thresholds they were tuned with.
    Reads the memory-mapped cache one batch at a time.
    """
    out = []
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="predict", unit="batch")
    for start in starts:
        chunk = np.asarray(rows[start : start + batch_size])
        grey = torch.from_numpy(np.ascontiguousarray(cache.pixels[chunk]))[:, None]  # [B,1,S,S] uint8
        out.append(bundle.predict_proba(grey, batch_size=batch_size).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(bundle.labels)), dtype=np.float32)


# --------------------------------------------------------------------------- scoring


@dataclass
class EvalResult:
    labels: list[str]
    scored: list[str]
    targets: dict[str, dict]
    headline: dict[str, Estimate]
    provenance: dict
    split: str
    n_images: int
    n_patients: int
    bootstrap: dict
    per_image: dict = field(default_factory=dict)   # findings called vs carried per image (see score_predictions)
    # Kept for plots, not written to JSON.
    y_true: np.ndarray = field(repr=False, default=None)
    y_prob: np.ndarray = field(repr=False, default=None)
    thresholds: np.ndarray = field(repr=False, default=None)
    info: dict = field(default_factory=dict)

    @property
    def mean_f1_scored(self) -> float:
        return self.headline["mean_f1_scored"].value

    def to_json(self) -> dict:
        # json_safe over the whole: info and provenance may carry floats too; JSON has no NaN.
        return json_safe({
            **self.info,
            "split": self.split,
            "n_images": self.n_images,
            "n_patients": self.n_patients,
            "scored_targets": self.scored,
            "mean_f1_scored": json_safe(self.mean_f1_scored),
            "headline": {k: v.to_dict() for k, v in self.headline.items()},
            "threshold_source": self.provenance,
            "per_image": self.per_image,
            "bootstrap": self.bootstrap,
            "targets": self.targets,
        })


def score_predictions(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray, patient_ids, labels,
                      *, provenance: dict, split: str, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED, info: dict | None = None, groups=None) -> EvalResult:
    """Score fixed predictions. ``thresholds`` is ``[K]`` or ``[N, K]`` (pooled folds). ``groups``: the training
    seed of each row when several seeds' predictions are stacked (resampled too: :class:`PatientBootstrap`).

    This function trusts its caller about where the thresholds came from (``provenance``);
    :func:`evaluate_run` and the cross-validation benchmark establish it before calling here.
    """
    labels = list(labels)
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError(f"no images to score on split {split!r}")
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), y_prob.shape)
    scored = [name for name in SCORED_TARGETS if name in labels]
    si = [labels.index(name) for name in scored]

    def stat(w):
        f1 = M.f1_at(y_true, y_prob, thr, w)
        au = M.auroc(y_true, y_prob, w)
        ap = M.average_precision(y_true, y_prob, w)
        triv = M.trivial_f1(y_true, w)
        mean = lambda a: a[..., si].mean(axis=-1, keepdims=True) if si else np.full(a.shape[:-1] + (1,), np.nan)
        return {"f1": f1, "auroc": au, "ap": ap, "mean_f1_scored": mean(f1), "mean_auroc_scored": mean(au),
                "mean_trivial_f1_scored": mean(triv)}

    point = stat(None)
    bootstrap = PatientBootstrap(patient_ids, n_resamples, seed, groups=groups)
    boot = bootstrap.run(stat)
    est = {name: estimates(point[name], boot[name]) for name in point}

    c = M.confusion(y_true, y_prob, thr)
    rates = M.rates_from_counts(c)
    f1_half = M.f1_at(y_true, y_prob, 0.5)
    triv = M.trivial_f1(y_true)
    targets = {}
    # The scored targets come first, in SCORED_TARGETS order, then the other labels.
    for name in scored + [n_ for n_ in labels if n_ not in scored]:
        k = labels.index(name)
        per_image_thr = np.unique(thr[:, k])
        targets[name] = {
            "scored": name in scored,
            "n": int(len(y_true)),
            "positives": int(y_true[:, k].sum()),
            "prevalence": float(y_true[:, k].mean()) if len(y_true) else float("nan"),
            # One number when all images share it; pooled CV folds report their mean and the range.
            "threshold": float(per_image_thr.mean()),
            "threshold_range": [float(per_image_thr.min()), float(per_image_thr.max())],
            "f1": float(est["f1"][k].value),
            "f1_ci": [est["f1"][k].lo, est["f1"][k].hi],
            "f1_at_0.5": float(f1_half[k]),
            "trivial_f1": float(triv[k]),
            "auroc": json_safe(est["auroc"][k].value),
            "auroc_ci": [json_safe(est["auroc"][k].lo), json_safe(est["auroc"][k].hi)],
            "ap": json_safe(est["ap"][k].value),
            "ap_ci": [json_safe(est["ap"][k].lo), json_safe(est["ap"][k].hi)],
            **{r: json_safe(float(v[k])) for r, v in rates.items()},
            **{n_: int(round(v[k])) for n_, v in c.items()},
            "ece": json_safe(M.expected_calibration_error(y_true[:, k], y_prob[:, k])),
        }
    # What a reader meets per film: how many findings the operating points call against how many the image
    # carries (issue 20: a weak model at F1-tuned thresholds calls several times too many).
    n = len(y_true)                   # > 0: an empty set was refused above
    per_image = {"labels": len(labels), "called": float((c["tp"] + c["fp"]).sum() / n),
                 "carried": float(y_true.sum() / n), "scored_called": float((c["tp"] + c["fp"])[si].sum() / n),
                 "scored_carried": float(y_true[:, si].sum() / n)}
    headline = {name: est[name][0] for name in ("mean_f1_scored", "mean_auroc_scored", "mean_trivial_f1_scored")}
    return EvalResult(
        labels=labels, scored=scored, targets=targets, headline=headline, provenance=provenance, split=split,
        n_images=int(len(y_true)), n_patients=int(len(np.unique(np.asarray(patient_ids).astype(str)))),
        bootstrap={"unit": bootstrap.unit, "resamples": n_resamples, "seed": seed, "interval": "percentile 95%"},
        per_image=per_image, y_true=y_true, y_prob=y_prob, thresholds=np.array(thr), info=dict(info or {}),
    )


def cache_targets(cache, labels, data: str = "cache") -> np.ndarray:
    """``[N, K]`` ground truth for ``labels`` from a labelled cache, with a clear error otherwise."""
    if not cache.meta.get("labelled", True):
        raise ValueError(f"{data}: this cache is unlabelled (a folder of images without NIH labels); "
                         "evaluation needs a labelled cache")
    try:
        return np.asarray(cache.labels(list(labels)), dtype=np.float64)
    except KeyError as exc:
        raise ValueError(f"{data}: the cache has no label column for {exc}") from exc


def read_bundle_meta(run: str | os.PathLike) -> dict:
    """``RUN/bundle.json`` as a dict, with a clear error when ``run`` is not a bundle."""
    path = Path(run) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a cxrvit model bundle ({META_FILE} missing)")
    return read_meta(path)


def bundle_thresholds(bundle, run: str = "bundle") -> np.ndarray:
    missing = [name for name in bundle.labels if name not in bundle.thresholds]
    if missing:
        raise ValueError(f"{run}: bundle.json has no threshold for {', '.join(missing)}")
    return np.array([bundle.thresholds[name] for name in bundle.labels], dtype=np.float64)


def evaluate_run(run: str | os.PathLike, data: str | os.PathLike, split: str = "test", *,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, device=None,
                 batch_size: int = 64, allow_unverified_thresholds: bool = False, progress: bool = False,
                 bundle=None, cache=None) -> EvalResult:
    """Load ``run`` (a bundle folder) and ``data`` (a cache folder), predict ``split`` and score it.

    ``bundle``/``cache`` may be passed already loaded (the paths are then only used in messages).
    """
    run, data = str(run), str(data)
    cache = cache if cache is not None else CXRCache(data)
    # The guard needs only bundle.json: check it before paying for the weights.
    source = (bundle.threshold_source if bundle is not None else read_bundle_meta(run).get("threshold_source")) or {}
    rows = select_rows(cache, split, source.get("images"), data=data)
    # The only way to score tuning images is to ask for them by name: split == "val".
    provenance = check_thresholds_held_out(source, cache, rows, allow_in_sample=(split == "val"),
                                           allow_unverified=allow_unverified_thresholds, run=run)
    bundle = bundle if bundle is not None else load_bundle(run, device=resolve_device(device))
    y_true = cache_targets(cache, bundle.labels, data)[rows]
    y_prob = predict_rows(bundle, cache, rows, batch_size=batch_size, progress=progress)
    info = {"run": run, "data": data, "cache_size": int(cache.size), "model_size": int(bundle.preprocessing.size),
            "arch": bundle.arch}
    trained_at = bundle.preprocessing.source_size
    if trained_at and trained_at != cache.size:
        # The scored pictures are not the model's training pictures' kind: upsampled from another side (sharper or
        # blurrier than it was fitted and thresholded on). Scores stay valid for these inputs; say so beside them.
        info["input_note"] = (f"{data} is cached at {cache.size} px, the model's training images at {trained_at} px "
                              f"(bundle preprocessing.source_size): the scores are for inputs of another resolution "
                              f"than its thresholds were tuned on")
    return score_predictions(
        y_true, y_prob, bundle_thresholds(bundle, run), np.asarray(cache.patient_ids)[rows], bundle.labels,
        provenance=provenance, split=split, n_resamples=n_resamples, seed=seed, info=info,
    )
