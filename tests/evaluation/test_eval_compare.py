"""Paired comparison and the patient bootstrap it rests on."""
import json

import numpy as np
import pytest
from evalfakes import LABELS, FakeCache, make_bundle

from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.bootstrap import Estimate, PatientBootstrap, estimates, percentile_ci, verdict
from cxrvit.evaluation.compare import compare_runs, gain_contrast, paired_compare
from cxrvit.evaluation.evaluate import ThresholdLeakError, select_rows


def _preds(seed=0, n_patients=120):
    cache = FakeCache(n_patients=n_patients, seed=seed)
    y = cache.labels(LABELS).astype(float)
    rng = np.random.default_rng(seed)
    weak = np.clip(0.15 * y + rng.random(y.shape) * 0.85, 0, 1)
    strong = np.clip(0.6 * y + rng.random(y.shape) * 0.4, 0, 1)
    return cache, y, weak, strong


def test_a_95_percent_interval_cuts_2_5_percent_off_each_tail_ignoring_failed_resamples():
    """Resamples 0, 1, ..., 1000 (in shuffled order, with NaN rows for resamples where the statistic was
    undefined): the 2.5th and 97.5th percentiles are 25 and 975 by hand; a 90 % interval, 50 and 950."""
    values = np.random.default_rng(0).permutation(np.arange(1001.0))
    samples = np.stack([values, 2 * values], axis=1)
    samples = np.insert(samples, [10, 500, 900], np.nan, axis=0)
    lo, hi, valid = percentile_ci(samples)
    np.testing.assert_allclose(lo, [25.0, 50.0], atol=1e-9)
    np.testing.assert_allclose(hi, [975.0, 1950.0], atol=1e-9)
    assert valid.tolist() == [1001, 1001]
    est = estimates(np.array([500.0, 1000.0]), samples, level=0.9)
    np.testing.assert_allclose([(e.lo, e.hi) for e in est], [(50.0, 950.0), (100.0, 1900.0)], atol=1e-9)
    assert [(e.value, e.level, e.valid_resamples) for e in est] == [(500.0, 0.9, 1001), (1000.0, 0.9, 1001)]


def test_bootstrap_resamples_whole_patients_and_is_seeded():
    pids = np.array(["a", "a", "b", "c", "c", "c"])
    boot = PatientBootstrap(pids, n_resamples=50, seed=3, chunk=7)
    w = np.concatenate(list(boot.weights()))
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()  # a patient's images move together
    # each resample draws as many patients as there are: 3 draws -> weights sum per patient = 3
    per_patient = w[:, [0, 2, 3]]
    assert (per_patient.sum(1) == 3).all()
    w2 = np.concatenate(list(PatientBootstrap(pids, n_resamples=50, seed=3, chunk=50).weights()))
    np.testing.assert_array_equal(w, w2)  # chunking does not change the draws


def test_crossed_bootstrap_draws_seeds_and_patients_and_leaves_one_seed_alone():
    pids = np.tile(np.array(["a", "a", "b", "c"]), 3)           # the same 4 images under 3 seeds
    seeds = np.repeat([0, 1, 2], 4)
    w = np.concatenate(list(PatientBootstrap(pids, n_resamples=200, seed=5, groups=seeds).weights()))
    plain = np.concatenate(list(PatientBootstrap(pids, n_resamples=200, seed=5).weights()))
    # a row's weight = its patient's draws x its seed's draws; each resample draws 3 patients and 3 seeds.
    # Read the seed draws off the most-drawn patient of the resample (drawn at least once).
    top = plain[:, :4].argmax(1)
    seed_draws = np.stack([w[np.arange(len(w)), top + 4 * k] / plain[np.arange(len(w)), top] for k in range(3)], 1)
    assert np.allclose(seed_draws.sum(1), 3) and set(np.unique(seed_draws)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(w, plain * np.repeat(seed_draws, 4, axis=1))
    assert (seed_draws == 0).any(axis=1).mean() > 0.5             # most resamples leave a seed out (P = 7/9)
    # one group is no group: the plain patient bootstrap, draw for draw
    one = np.concatenate(list(PatientBootstrap(pids, n_resamples=200, seed=5, groups=np.zeros(12)).weights()))
    np.testing.assert_array_equal(one, plain)
    with pytest.raises(ValueError, match="one group per image"):
        PatientBootstrap(pids, groups=seeds[:5])


def test_seed_to_seed_variation_widens_the_paired_interval_only_when_seeds_differ():
    """Arm B is A plus a shift that changes sign with the seed: patient-only resampling holds the three seeds'
    models fixed and sees a tight interval around their average; resampling seeds shows that another seed could
    land anywhere in their spread. Where every seed's predictions are the same, the two intervals agree."""
    cache, y, weak, _ = _preds(n_patients=150)
    rng = np.random.default_rng(0)
    shifts = [0.25, -0.2, 0.02]
    a = np.concatenate([weak] * 3)
    b = np.concatenate([np.clip(weak + s * (y - 0.5) + 0.01 * rng.random(y.shape), 0, 1) for s in shifts])
    yy, pids, seeds = np.concatenate([y] * 3), np.tile(cache.patient_ids, 3), np.repeat([0, 1, 2], len(y))
    fixed = paired_compare(yy, a, 0.5, b, 0.5, pids, LABELS, n_resamples=300)
    crossed = paired_compare(yy, a, 0.5, b, 0.5, pids, LABELS, n_resamples=300, groups=seeds)
    width = lambda c: c.diff_auroc["mean"].hi - c.diff_auroc["mean"].lo
    assert crossed.diff_auroc["mean"].value == fixed.diff_auroc["mean"].value   # the point estimate is unchanged
    assert width(crossed) > 2 * width(fixed)
    assert (fixed.bootstrap["unit"], crossed.bootstrap["unit"]) == ("patient", "patient x seed")
    same_b = np.concatenate([b[: len(y)]] * 3)
    f2 = paired_compare(yy, a, 0.5, same_b, 0.5, pids, LABELS, n_resamples=300)
    c2 = paired_compare(yy, a, 0.5, same_b, 0.5, pids, LABELS, n_resamples=300, groups=seeds)
    assert (c2.diff_auroc["mean"].lo, c2.diff_auroc["mean"].hi) == pytest.approx(
        (f2.diff_auroc["mean"].lo, f2.diff_auroc["mean"].hi), abs=0.01)


def test_identical_models_differ_by_exactly_zero():
    cache, y, weak, _ = _preds()
    c = paired_compare(y, weak, 0.5, weak, 0.5, cache.patient_ids, LABELS, n_resamples=100)
    for key in c.targets + ["mean"]:
        assert c.diff_f1[key].value == 0 and c.diff_f1[key].lo == 0 and c.diff_f1[key].hi == 0
    assert "no significant difference" in c.verdict


def test_better_model_is_detected_and_point_difference_is_exact():
    cache, y, weak, strong = _preds()
    c = paired_compare(y, weak, 0.5, strong, 0.5, cache.patient_ids, LABELS, names=("baseline", "improved"),
                       n_resamples=200)
    f1w, f1s = M.f1_at(y[:, :3], weak[:, :3], 0.5), M.f1_at(y[:, :3], strong[:, :3], 0.5)
    assert c.diff_f1["mean"].value == pytest.approx((f1s - f1w).mean())
    assert c.diff_auroc["Effusion"].value == pytest.approx(M.auroc(y, strong)[1] - M.auroc(y, weak)[1])
    assert c.diff_f1["mean"].lo > 0
    assert c.verdict.startswith("improved − baseline mean F1 = +") and c.verdict.endswith("improved is better")
    assert c.targets == ["Atelectasis", "Effusion", "Mass/Nodule"]
    assert "| **mean** |" in c.markdown()


def test_gain_contrast_is_the_difference_of_two_gains_on_the_same_patients():
    cache, y, weak, strong = _preds()
    pids = cache.patient_ids
    # curve A does not move (weak -> weak), curve B goes weak -> strong: B gains more, beyond noise
    g = gain_contrast(y, (weak, 0.5), (weak, 0.5), (weak, 0.5), (strong, 0.5), pids, LABELS, curves=("A", "B"),
                      shares=("0.25", "1"), n_resamples=200)
    gain_b = M.auroc(y[:, :3], strong[:, :3]) - M.auroc(y[:, :3], weak[:, :3])
    assert g.diff_auroc["Effusion"].value == pytest.approx(gain_b[1])
    assert g.diff_auroc["mean"].value == pytest.approx(gain_b.mean())
    assert g.gain_auroc["mean"] == pytest.approx((0.0, gain_b.mean()))
    assert g.diff_auroc["mean"].lo > 0 and g.diff_f1["mean"].lo > 0
    # the same move on both curves: exactly zero, in every resample
    same = gain_contrast(y, (weak, 0.5), (strong, 0.5), (weak, 0.5), (strong, 0.5), pids, LABELS, n_resamples=50)
    assert all(e.value == e.lo == e.hi == 0 for e in list(same.diff_auroc.values()) + list(same.diff_f1.values()))
    # swapping the curves flips the sign, CI included
    flip = gain_contrast(y, (weak, 0.5), (strong, 0.5), (weak, 0.5), (weak, 0.5), pids, LABELS, n_resamples=200)
    assert flip.diff_auroc["mean"].value == pytest.approx(-g.diff_auroc["mean"].value)
    assert flip.diff_auroc["mean"].hi == pytest.approx(-g.diff_auroc["mean"].lo)
    assert g.to_json()["difference"] == "(b_hi - b_lo) - (a_hi - a_lo)"
    with pytest.raises(ValueError, match="same images: got 10 rows"):
        gain_contrast(y, (weak, 0.5), (weak[:10], 0.5), (weak, 0.5), (strong, 0.5), pids, LABELS)


def test_pairing_narrows_the_interval():
    """Same patients for both models: the CI of a difference between two noisy but correlated
    models is narrower than combining their separate intervals would suggest."""
    cache, y, weak, _ = _preds(n_patients=150)
    rng = np.random.default_rng(5)
    other = np.clip(weak + rng.normal(0, 0.03, weak.shape), 0, 1)
    c = paired_compare(y, weak, 0.5, other, 0.5, cache.patient_ids, LABELS, n_resamples=200)
    paired_width = c.diff_auroc["mean"].hi - c.diff_auroc["mean"].lo
    boot = PatientBootstrap(cache.patient_ids, 200, seed=1).run(lambda w: {"a": M.auroc(y[:, :3], weak[:, :3], w)})
    single_width = np.subtract(*np.nanquantile(boot["a"].mean(1), [0.975, 0.025]))
    assert paired_width < single_width / 3


def test_verdict_wording():
    assert verdict("mean F1", Estimate(0.043, 0.012, 0.071), a="improved", b="baseline") == (
        "improved − baseline mean F1 = +0.043 (95% CI +0.012 to +0.071): improved is better")
    assert verdict("mean F1", Estimate(-0.05, -0.08, -0.01), a="B", b="A").endswith("A is better")


def test_compare_runs_uses_same_rows_and_refuses_leaks(tmp_path, cache):
    train_val = np.flatnonzero(cache.index["official_split"].to_numpy() == "train_val")
    a = make_bundle(tmp_path / "a", cache, train_val[:5], seed=0)
    b = make_bundle(tmp_path / "b", cache, train_val[5:10], seed=1)
    c = compare_runs(a, b, "C", "test", cache=cache, n_resamples=30)
    assert c.n_images == len(select_rows(cache, "test")) and c.names == ("a", "b")
    leaky = make_bundle(tmp_path / "leaky", cache, select_rows(cache, "test")[:2], seed=1)
    with pytest.raises(ThresholdLeakError):
        compare_runs(a, leaky, "C", "test", cache=cache, n_resamples=10)
    with pytest.raises(ValueError, match="held-out"):
        compare_runs(a, b, "C", "val", cache=cache)


def test_comparison_json_is_strict_where_an_auroc_is_undefined():
    """A target without a positive among the images has a NaN AUROC; the JSON says null, never NaN."""
    cache, y, weak, strong = _preds(n_patients=40)
    y[:, LABELS.index("Mass/Nodule")] = 0
    c = paired_compare(y, weak, 0.5, strong, 0.5, cache.patient_ids, LABELS, n_resamples=20)
    out = json.loads(json.dumps(c.to_json(), allow_nan=False))
    mass = out["targets"]["Mass/Nodule"]
    assert mass["auroc_a"] is None and mass["auroc_b"] is None and mass["diff_auroc"]["value"] is None
    assert out["targets"]["Effusion"]["auroc_b"] == pytest.approx(M.auroc(y, strong)[1])
    g = gain_contrast(y, (weak, 0.5), (strong, 0.5), (weak, 0.5), (strong, 0.5), cache.patient_ids, LABELS,
                      n_resamples=20)
    gains = json.loads(json.dumps(g.to_json(), allow_nan=False))["gain_auroc"]
    assert gains["Mass/Nodule"] == [None, None] and all(v is not None for v in gains["Effusion"])
