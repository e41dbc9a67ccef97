"""bench/compare_arms.py: two arms from two OUT folders, paired on the same held-out rows (fixture images)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrvit.data.cache import CXRCache, prepare_cache
from cxrvit.evaluation.compare import paired_compare
from cxrvit.experiments.crossval import FoldPredictions, save_fold

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "compare_arms.py"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cache"
    prepare_cache(ROOT / "tests" / "fixtures" / "nih", out, 32, progress=False, workers=1, log=lambda _m: None)
    return CXRCache(out)


def _write_arm(out: Path, arm: str, folds, labels, rng, shift=0.0):
    for f, rows in enumerate(folds):
        probs = np.clip(rng.random((len(rows), len(labels))) + shift, 0, 1)
        save_fold(out / f"fold{f}" / arm / "heldout.npz",
                  FoldPredictions(rows, probs, np.full(len(labels), 0.5), list(labels), 1.0), "hash")


def test_pools_both_arms_and_pairs_them_like_the_arms_table(cache, tmp_path):
    labels = ["Atelectasis", "Effusion", "Mass/Nodule"]
    n = len(cache)
    folds = [np.arange(0, n, 2), np.arange(1, n, 2)]
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for f in range(2):
        (tmp_path / "a" / f"fold{f}" / "x").mkdir(parents=True)
        (tmp_path / "b" / f"fold{f}" / "y").mkdir(parents=True)
    _write_arm(tmp_path / "a", "x", folds, labels, rng)
    _write_arm(tmp_path / "b", "y", folds, labels, rng, shift=0.1)
    js = tmp_path / "cmp.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), "x", str(tmp_path / "b"), "y",
                          "--data", str(cache.root), "--names", "A", "B", "--json", str(js)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "| **mean** |" in run.stdout and f"({n} images of" in run.stdout
    got = json.loads(js.read_text())
    # the same numbers as pooling by hand and calling the library's paired bootstrap
    from cxrvit.experiments.crossval import load_fold, pool
    pa = pool([load_fold(tmp_path / "a" / f"fold{f}" / "x" / "heldout.npz")[0] for f in range(2)], labels)
    pb = pool([load_fold(tmp_path / "b" / f"fold{f}" / "y" / "heldout.npz")[0] for f in range(2)], labels)
    ref = paired_compare(cache.labels(labels)[pa[0]], pa[1], pa[2], pb[1], pb[2],
                         np.asarray(cache.patient_ids)[pa[0]], labels, names=("A", "B"))
    assert got == json.loads(json.dumps(ref.to_json()))


def test_refuses_arms_scored_on_different_images(cache, tmp_path):
    labels = ["Atelectasis", "Effusion", "Mass/Nodule"]
    n = len(cache)
    rng = np.random.default_rng(0)
    for out, arm, rows in (("a", "x", [np.arange(0, n, 2)]), ("b", "y", [np.arange(1, n, 2)])):
        (tmp_path / out / "fold0" / arm).mkdir(parents=True)
        _write_arm(tmp_path / out, arm, rows, labels, rng)
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), "x", str(tmp_path / "b"), "y",
                          "--data", str(cache.root)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "scored on different images" in run.stderr


def test_seeds_are_stacked_and_resampled_with_the_patients(cache, tmp_path):
    labels = ["Atelectasis", "Effusion", "Mass/Nodule"]
    n = len(cache)
    folds = [np.arange(0, n, 2), np.arange(1, n, 2)]
    rng = np.random.default_rng(1)
    for out, arm, shift in (("a", "x", 0.0), ("b", "y", 0.1)):
        for seed in (0, 1):
            folder = arm if seed == 0 else f"{arm}-seed{seed}"
            for f in range(2):
                (tmp_path / out / f"fold{f}" / folder).mkdir(parents=True)
            _write_arm(tmp_path / out, folder, folds, labels, rng, shift=shift)
    js = tmp_path / "cmp.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), "x", str(tmp_path / "b"), "y",
                          "--data", str(cache.root), "--seeds", "0", "1", "--json", str(js)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert f"({2 * n} images of" in run.stdout
    from cxrvit.experiments.crossval import load_fold, pool

    def stacked(out, arm):
        parts = [pool([load_fold(tmp_path / out / f"fold{f}" / (arm if s == 0 else f"{arm}-seed{s}") / "heldout.npz")[0]
                       for f in range(2)], labels) for s in (0, 1)]
        return [np.concatenate([p[i] for p in parts]) for i in range(3)]

    (ra, pa, ta), (_, pb, tb) = stacked("a", "x"), stacked("b", "y")
    ref = paired_compare(cache.labels(labels)[ra], pa, ta, pb, tb, np.asarray(cache.patient_ids)[ra], labels,
                         names=("x@a", "y@b"), groups=np.repeat([0, 1], n))
    assert json.loads(js.read_text()) == json.loads(json.dumps(ref.to_json()))
    assert ref.bootstrap["unit"] != paired_compare(cache.labels(labels)[ra], pa, ta, pb, tb,
                                                   np.asarray(cache.patient_ids)[ra], labels).bootstrap["unit"]
