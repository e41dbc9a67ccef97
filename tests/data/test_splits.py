"""Patient-wise splits: no patient on two sides, ever; seeded and deterministic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrvit.data import splits
from cxrvit.data.cache import CXRCache, prepare_cache
from cxrvit.labels import SCORED_TARGETS


def _patients_of(pids: np.ndarray, rows: np.ndarray) -> set[str]:
    return set(pids[rows].astype(str))


def _check_partition(pids, rows, parts):
    """``parts`` cover ``rows`` exactly once, and no patient is in two parts."""
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.sort(rows))
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not _patients_of(pids, parts[i]) & _patients_of(pids, parts[j])


@pytest.fixture
def grouped():
    """Synthetic patient IDs with 1-12 images each (the structure, not the data, is under test)."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 13, size=300)
    pids = np.repeat([f"p{i}" for i in range(300)], sizes).astype(object)
    perm = rng.permutation(len(pids))  # a patient's images are scattered over the cache
    labels = (rng.random((len(pids), 3)) < 0.12).astype(np.float32)
    return pids[perm], labels


def test_carve_validation_is_patient_wise_seeded_and_sized(grouped):
    pids, _ = grouped
    rows = np.arange(len(pids))
    for seed in range(5):
        train, val = splits.carve_validation(rows, pids, fraction=0.2, seed=seed)
        _check_partition(pids, rows, [train, val])
        assert abs(len(val) / len(rows) - 0.2) < 0.02
    a = splits.carve_validation(rows, pids, 0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, splits.carve_validation(rows, pids, 0.2, seed=3)))
    assert not np.array_equal(a[1], splits.carve_validation(rows, pids, 0.2, seed=4)[1])
    # order of the input rows does not matter, only their set
    shuffled = np.random.default_rng(0).permutation(rows)
    assert np.array_equal(splits.carve_validation(shuffled, pids, 0.2, seed=3)[1], a[1])


def test_patient_subset_is_nested_patient_wise_and_sized(grouped):
    pids, _ = grouped
    rows = np.arange(len(pids))[::3]
    n_patients = len(_patients_of(pids, rows))
    quarter, half, whole = (splits.patient_subset(rows, pids, f, seed=5) for f in (0.25, 0.5, 1.0))
    assert np.array_equal(whole, np.sort(rows))
    assert set(quarter) < set(half) < set(whole)          # nested: more data only ever adds patients
    for part, f in ((quarter, 0.25), (half, 0.5)):
        kept = _patients_of(pids, part)
        assert len(kept) == round(f * n_patients)
        # whole patients: every image of a kept patient comes along
        assert np.array_equal(part, np.sort(rows[np.isin(pids[rows].astype(str), list(kept))]))
    assert np.array_equal(quarter, splits.patient_subset(np.random.default_rng(1).permutation(rows), pids, 0.25, 5))
    assert not np.array_equal(quarter, splits.patient_subset(rows, pids, 0.25, seed=6))
    assert len(_patients_of(pids, splits.patient_subset(rows, pids, 1e-6, seed=0))) == 1
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="training fraction"):
            splits.patient_subset(rows, pids, bad)


def test_kfold_is_patient_wise_balanced_and_seeded(grouped):
    pids, labels = grouped
    rows = np.arange(0, len(pids), 1)[::2]  # a subset of the cache, as after removing a test split
    for seed in (0, 1):
        folds = splits.patient_kfold(rows, pids, k=5, seed=seed, labels=labels)
        assert len(folds) == 5
        _check_partition(pids, rows, [held for _, held in folds])
        for train, held in folds:
            _check_partition(pids, rows, [train, held])
        sizes = np.array([len(h) for _, h in folds])
        assert sizes.max() - sizes.min() <= 0.05 * len(rows)
        pos = np.array([labels[h].sum(0) for _, h in folds])
        fair = labels[rows].sum(0) / 5
        assert (np.abs(pos - fair) <= np.maximum(0.15 * fair, 2)).all()
    again = splits.patient_kfold(rows, pids, k=5, seed=1, labels=labels)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    plain = splits.patient_kfold(rows, pids, k=3, seed=0)
    _check_partition(pids, rows, [h for _, h in plain])


def test_bad_arguments(grouped):
    pids, _ = grouped
    with pytest.raises(ValueError, match="fraction"):
        splits.carve_validation(np.arange(10), pids, fraction=1.5)
    with pytest.raises(ValueError, match="k=1"):
        splits.patient_kfold(np.arange(10), pids, k=1)
    with pytest.raises(ValueError, match="two sides"):
        splits.assert_patient_disjoint(np.array(["a", "a", "b"], dtype=object), [0], [1, 2])


def test_official_split_on_fixtures(nih_dir: Path, tmp_path: Path):
    cache = prepare_cache(nih_dir, tmp_path / "c", 16, workers=1, progress=False, log=lambda *_: None)
    train_val, test = splits.official_split(cache)
    assert (len(train_val), len(test)) == (7, 5)
    assert set(cache.names[test]) == {"00000211_000.png", "00000211_013.png", "00001369_000.png",
                                      "00002061_000.png", "00010277_000.png"}
    _check_partition(cache.patient_ids, np.arange(12), [train_val, test])


def test_official_split_absent_is_an_error(nih_dir: Path, tmp_path: Path):
    cache = prepare_cache(nih_dir, tmp_path / "u", 16, unlabelled=True, workers=1, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="no image has an official split"):
        splits.official_split(cache)


def test_real_sample_splits_never_share_a_patient(real_cache: CXRCache):
    pids = real_cache.patient_ids
    train_val, test = splits.official_split(real_cache)
    assert (len(train_val), len(test)) == (956, 143)
    _check_partition(pids, np.arange(len(real_cache)), [train_val, test])
    for seed in range(3):
        train, val = splits.carve_validation(train_val, pids, 0.15, seed=seed)
        _check_partition(pids, train_val, [train, val])
        folds = splits.patient_kfold(train_val, pids, k=5, seed=seed, labels=real_cache.labels(SCORED_TARGETS))
        _check_partition(pids, train_val, [h for _, h in folds])
