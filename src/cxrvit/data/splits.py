"""Patient-wise splits: NIH's official split, a seeded validation carve-out, and k-fold.

Patients in ChestX-ray14 have up to ~180 follow-up images; an image-wise split puts the same
patient's lungs on both sides and inflates every score. So every function here assigns whole
patients, and all randomness comes from a ``numpy`` generator seeded by the caller: the same
seed gives the same split on any machine.

Row arguments and results are int64 row indices of the cache (``cache.pixels[rows]``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cxrvit.data.cache import CXRCache


def _rows(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValueError(f"rows must be a 1-D array of cache row indices, got shape {rows.shape}")
    return rows


def _patient_groups(rows: np.ndarray, patient_ids) -> tuple[np.ndarray, np.ndarray]:
    """Unique patients (sorted, so the order never depends on row order) and each row's patient number."""
    pids = np.asarray(patient_ids, dtype=object)[rows].astype(str)
    patients, inverse = np.unique(pids, return_inverse=True)
    return patients, inverse


def assert_patient_disjoint(patient_ids, *row_sets) -> None:
    """Raise if any patient has rows in two of ``row_sets``."""
    pids = np.asarray(patient_ids, dtype=object)
    seen: dict[str, int] = {}
    for i, rows in enumerate(row_sets):
        for pid in set(pids[_rows(rows)].astype(str)):
            if seen.setdefault(pid, i) != i:
                raise ValueError(f"patient {pid} is on two sides of a split (sets {seen[pid]} and {i})")


def official_split(cache: "CXRCache") -> tuple[np.ndarray, np.ndarray]:
    """NIH's ``train_val_list.txt`` / ``test_list.txt`` as row indices ``(train_val, test)``.

    Images neither list names are in neither result.
    """
    split = cache.index["official_split"].to_numpy(dtype=object)
    train_val, test = np.flatnonzero(split == "train_val"), np.flatnonzero(split == "test")
    if len(train_val) + len(test) == 0:
        raise ValueError(
            f"{cache.root}: no image has an official split (train_val_list.txt / test_list.txt were not found "
            "when the cache was prepared); use carve_validation or patient_kfold instead"
        )
    assert_patient_disjoint(cache.patient_ids, train_val, test)
    return train_val.astype(np.int64), test.astype(np.int64)


def carve_validation(rows, patient_ids, fraction: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into ``(train, val)`` by patient, with about ``fraction`` of the images in val.

    Patients are taken in a seeded random order until val holds ``fraction`` of the images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rows = _rows(rows)
    patients, inverse = _patient_groups(rows, patient_ids)
    if len(patients) < 2:
        raise ValueError(f"cannot carve a validation set from {len(patients)} patient(s)")
    counts = np.bincount(inverse, minlength=len(patients))
    order = np.random.default_rng(seed).permutation(len(patients))
    target = fraction * len(rows)
    # Smallest prefix of the shuffled patients that reaches the target; at least one patient each side.
    n_val = int(np.searchsorted(np.cumsum(counts[order]), target) + 1)
    n_val = min(max(n_val, 1), len(patients) - 1)
    is_val = np.zeros(len(patients), dtype=bool)
    is_val[order[:n_val]] = True
    val_mask = is_val[inverse]
    return np.sort(rows[~val_mask]), np.sort(rows[val_mask])


def patient_subset(rows, patient_ids, fraction: float, seed: int = 0) -> np.ndarray:
    """The rows of about ``fraction`` of the patients in ``rows`` (at least one), for data-scaling runs.

    Patients are taken in one seeded random order, so for a given seed the subsets are nested: the
    quarter lies inside the half, which lies inside the whole. Counting patients rather than images
    keeps a patient's follow-ups together, as every other split here does.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"training fraction must be in (0, 1], got {fraction}")
    rows = _rows(rows)
    if fraction == 1.0:
        return np.sort(rows)
    patients, inverse = _patient_groups(rows, patient_ids)
    order = np.random.default_rng(seed).permutation(len(patients))
    keep = np.zeros(len(patients), dtype=bool)
    keep[order[: max(1, int(round(fraction * len(patients))))]] = True
    return np.sort(rows[keep[inverse]])


def patient_kfold(rows, patient_ids, k: int = 5, seed: int = 0, labels: np.ndarray | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` folds of ``(train, heldout)`` with each patient held out exactly once.

    ``labels``: optional ``[N_cache, K]`` 0/1 matrix (e.g. ``cache.labels(SCORED_TARGETS)``); the
    folds are then balanced on image counts *and* positives, greedily: patients with the most
    positives are placed first, each into the fold whose fill (relative to its fair share)
    grows least. Patient grouping is never traded for balance.
    """
    rows = _rows(rows)
    patients, inverse = _patient_groups(rows, patient_ids)
    if not 2 <= k <= len(patients):
        raise ValueError(f"k={k} folds need 2 <= k <= number of patients ({len(patients)})")
    stats = np.bincount(inverse, minlength=len(patients))[:, None].astype(np.float64)
    if labels is not None:
        lab = np.asarray(labels, dtype=np.float64)[rows]
        per_patient = np.zeros((len(patients), lab.shape[1]))
        np.add.at(per_patient, inverse, lab)
        stats = np.concatenate([stats, per_patient], axis=1)
    fair = np.maximum(stats.sum(0) / k, 1e-9)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(patients))  # seeded tie-break among equal patients
    order = shuffled[np.lexsort((-stats[shuffled, 0], -stats[shuffled, 1:].sum(1)))] if stats.shape[1] > 1 \
        else shuffled[np.argsort(-stats[shuffled, 0], kind="stable")]
    fill = np.zeros((k, stats.shape[1]))
    fold_of = np.empty(len(patients), dtype=np.int64)
    for p in order:
        ratio_after = (fill + stats[p]) / fair
        # growth of the sum of squared fill ratios: small folds attract, full folds repel
        cost = (ratio_after**2 - (fill / fair) ** 2).sum(1)
        f = int(np.argmin(cost))
        fold_of[p] = f
        fill[f] += stats[p]
    row_fold = fold_of[inverse]
    return [(np.sort(rows[row_fold != f]), np.sort(rows[row_fold == f])) for f in range(k)]
