"""cxrvit eval: split selection, the threshold guard, and scoring end to end on a tiny bundle."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from cxrvit.evaluation.evaluate import (ThresholdLeakError, check_thresholds_held_out, evaluate_run,
                                        predict_rows, score_predictions, select_rows)
from cxrvit.evaluation.report import markdown, provenance_line
from cxrvit.inference.bundle import load_bundle

from evalfakes import LABELS, FakeCache, make_bundle


def _val_rows(cache):
    return np.flatnonzero(cache.index["official_split"].to_numpy() == "train_val")[:10]


def test_split_selection(cache):
    test = select_rows(cache, "test")
    assert set(cache.index["official_split"].iloc[test]) == {"test"}
    assert len(select_rows(cache, "all")) == len(cache)
    cache.index["official_split"] = ""
    with pytest.raises(ValueError, match="--split all"):
        select_rows(cache, "test", data="C")
    with pytest.raises(ValueError, match="unknown split"):
        select_rows(cache, "train")


def test_a_cache_of_another_side_than_the_training_images_is_noted(tmp_path, cache):
    """Scores on pictures of another resolution than the model was fitted and thresholded on are valid for those
    pictures, not for the model's own kind: the result says so (and eval prints it)."""
    same = evaluate_run(make_bundle(tmp_path / "a", cache, _val_rows(cache), source_size=cache.size), "C", "test",
                        cache=cache, n_resamples=20)
    assert "input_note" not in same.to_json()
    other = evaluate_run(make_bundle(tmp_path / "b", cache, _val_rows(cache), source_size=2 * cache.size), "C",
                         "test", cache=cache, n_resamples=20)
    assert f"cached at {cache.size} px, the model's training images at {2 * cache.size} px" in other.info["input_note"]


def test_eval_end_to_end_json_keys(tmp_path, cache):
    run = make_bundle(tmp_path / "run", cache, _val_rows(cache))
    res = evaluate_run(run, "C", "test", cache=cache, n_resamples=50)
    out = res.to_json()
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN, no numpy scalars
    assert list(out["targets"])[:3] == ["Atelectasis", "Effusion", "Mass/Nodule"]  # scored first
    test_rows = select_rows(cache, "test")
    y = cache.labels(LABELS)[test_rows]
    for name in LABELS:
        t = out["targets"][name]
        for key in ("f1", "threshold", "auroc", "ap", "trivial_f1", "n", "positives"):
            assert key in t
        k = LABELS.index(name)
        assert t["n"] == len(test_rows) and t["positives"] == int(y[:, k].sum())
        assert t["tp"] + t["fp"] + t["fn"] + t["tn"] == t["n"]
        assert t["auroc"] == pytest.approx(roc_auc_score(y[:, k], res.y_prob[:, k]))
        assert t["auroc_ci"][0] <= t["auroc"] <= t["auroc_ci"][1]
    assert out["mean_f1_scored"] == pytest.approx(np.mean([out["targets"][n]["f1"] for n in LABELS[:3]]))
    assert out["threshold_source"] == {"split": "val", "verified": True, "in_sample": False,
                                       "tuning_images": 10, "overlap_images": 0}
    # same probabilities as the bundle's own API on the same (already model-sized) images
    bundle = load_bundle(run)
    x = torch.from_numpy(cache.pixels[test_rows[:4]])[:, None]
    np.testing.assert_allclose(bundle.predict_proba(x).numpy(), res.y_prob[:4], atol=1e-5)


def test_cache_at_another_size_is_resized(tmp_path):
    big = FakeCache(size=64)
    run = make_bundle(tmp_path / "run", big, [0])
    bundle = load_bundle(run)
    rows = select_rows(big, "test")[:3]
    p = predict_rows(bundle, big, rows)
    x = F.interpolate(torch.from_numpy(big.pixels[rows])[:, None].float() / 255, size=32, mode="bilinear",
                      antialias=True, align_corners=False)
    np.testing.assert_allclose(p, bundle.predict_proba(x).numpy(), atol=1e-5)


def test_guard_refuses_tuning_images_and_their_patients(tmp_path, cache):
    test_rows = select_rows(cache, "test")
    # Tuned on one test image -> every split that includes it (or its patient) is refused.
    run = make_bundle(tmp_path / "leaky", cache, test_rows[:1])
    for split in ("test", "all"):
        with pytest.raises(ThresholdLeakError, match="optimistic"):
            evaluate_run(run, "C", split, cache=cache, n_resamples=10)
    # A different image of the same patient is caught too (patient-level, not image-level).
    pid = cache.patient_ids[test_rows]
    multi = [p for p in np.unique(pid) if (pid == p).sum() > 1][0]
    same_patient = test_rows[pid == multi]
    with pytest.raises(ThresholdLeakError):
        check_thresholds_held_out({"split": "val", "images": [cache.index["image"][same_patient[0]]]}, cache,
                                  same_patient[1:])
    # Asking for the tuning images by name works, and is flagged as in-sample.
    res = evaluate_run(run, "C", "val", cache=cache, n_resamples=10)
    assert res.provenance["in_sample"] is True and res.n_images == 1


def _follow_up_cache(cache, tuned):
    """Another cache of the same patients without the tuning films themselves (their other films stay)."""
    other = FakeCache()
    keep = ~other.index["image"].isin(cache.index["image"].iloc[tuned]).to_numpy()
    other.index = other.index[keep].reset_index(drop=True)
    other.pixels, other.patient_ids = other.pixels[keep], other.patient_ids[keep]
    return other


def _tuning(cache):
    """First films of train_val patients with more than one film, so each has a follow-up elsewhere."""
    pid = cache.patient_ids
    many = {p for p in pid if (pid == p).sum() > 1}
    first = cache.index["image"].str.endswith("_000.png").to_numpy()
    tv = cache.index["official_split"].to_numpy() == "train_val"
    return np.flatnonzero(first & tv & np.isin(pid, list(many)))[:5]


def test_guard_reads_recorded_patients_against_another_cache(cache):
    tuned = _tuning(cache)
    other = _follow_up_cache(cache, tuned)
    rows = select_rows(other, "all")
    patients = sorted(set(cache.patient_ids[tuned]))
    source = {"split": "val", "images": cache.index["image"].iloc[tuned].tolist(), "patients": patients}
    assert np.isin(other.patient_ids, patients).any()         # the follow-up films are there...
    with pytest.raises(ThresholdLeakError, match=f"{len(patients)} patients"):
        check_thresholds_held_out(source, other, rows)       # ...and are refused, by patient ID
    held_out = rows[~np.isin(other.patient_ids[rows], patients)]
    prov = check_thresholds_held_out(source, other, held_out)
    assert prov["verified"] is True and prov["in_sample"] is False and prov["overlap_images"] == 0


def test_guard_without_patients_cannot_verify_images_absent_from_the_cache(cache):
    tuned = _tuning(cache)
    other = _follow_up_cache(cache, tuned)
    rows = select_rows(other, "all")
    source = {"split": "val", "images": cache.index["image"].iloc[tuned].tolist()}
    prov = check_thresholds_held_out(source, other, rows)     # it used to say verified, no overlap
    assert prov["verified"] is False and prov["in_sample"] is None
    assert prov["reason"].startswith(f"{len(tuned)} of the {len(tuned)} tuning images are not in this cache")
    assert "threshold_source.patients" in prov["reason"] and prov["reason"] in provenance_line(prov)
    # the same cache the images came from: looked up there, refused as before
    with pytest.raises(ThresholdLeakError, match="optimistic"):
        check_thresholds_held_out(source, cache, select_rows(cache, "all"))
    assert check_thresholds_held_out(source, cache, select_rows(cache, "test"))["verified"] is True


def test_guard_requires_recorded_threshold_source(cache):
    rows = select_rows(cache, "test")
    for source in ({}, {"split": "val"}):
        with pytest.raises(ThresholdLeakError, match="does not record"):
            check_thresholds_held_out(source, cache, rows)
    prov = check_thresholds_held_out({}, cache, rows, allow_unverified=True)
    assert prov["verified"] is False


def test_score_predictions_per_image_thresholds():
    cache = FakeCache(n_patients=30)
    y = cache.labels(LABELS).astype(float)
    rng = np.random.default_rng(0)
    p = np.clip(0.4 * y + rng.random(y.shape) * 0.6, 0, 1)
    thr = np.where(np.arange(len(y))[:, None] < len(y) // 2, 0.3, 0.7) * np.ones((1, len(LABELS)))
    res = score_predictions(y, p, thr, cache.patient_ids, LABELS, provenance={}, split="cv", n_resamples=20)
    pred = p >= thr
    for k, name in enumerate(LABELS):
        tp = (pred[:, k] & (y[:, k] == 1)).sum()
        assert res.targets[name]["tp"] == tp
        assert res.targets[name]["threshold_range"] == [0.3, 0.7]
    # findings per image: calls at the (per-image) thresholds against the labels each image carries
    scored = [LABELS.index(n) for n in ("Atelectasis", "Effusion", "Mass/Nodule")]
    assert res.per_image == pytest.approx({
        "labels": len(LABELS), "called": pred.sum(1).mean(), "carried": y.sum(1).mean(),
        "scored_called": pred[:, scored].sum(1).mean(), "scored_carried": y[:, scored].sum(1).mean()})
    assert res.to_json()["per_image"] == res.per_image
    assert f"**{res.per_image['called']:.2f} called** of 4 labels" in markdown(res)
