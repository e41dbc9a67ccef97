"""Every metric against scikit-learn or a case worked out by hand."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrvit.evaluation import metrics as M


def _data(n=200, k=3, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < [0.1, 0.3, 0.5][:k]).astype(int)
    s = np.clip(0.3 * y + rng.random((n, k)) * 0.8, 0, 1)
    if ties:
        s = np.round(s, 1)  # many equal scores
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_ap_match_sklearn(ties):
    y, s = _data(ties=ties)
    for k in range(y.shape[1]):
        assert M.auroc(y, s)[k] == pytest.approx(roc_auc_score(y[:, k], s[:, k]), abs=1e-12)
        assert M.average_precision(y, s)[k] == pytest.approx(average_precision_score(y[:, k], s[:, k]), abs=1e-12)


def test_weighted_metrics_equal_repeating_images():
    """A bootstrap weight of 2 must mean exactly 'this image appears twice'."""
    y, s = _data(n=60, ties=True, seed=3)
    w = np.random.default_rng(1).integers(0, 3, size=60)
    rep = np.repeat(np.arange(60), w)
    np.testing.assert_allclose(M.auroc(y, s, weights=w), M.auroc(y[rep], s[rep]), atol=1e-12)
    np.testing.assert_allclose(M.average_precision(y, s, weights=w), M.average_precision(y[rep], s[rep]), atol=1e-12)
    np.testing.assert_allclose(M.f1_at(y, s, 0.5, weights=w), M.f1_at(y[rep], s[rep], 0.5), atol=1e-12)
    np.testing.assert_allclose(M.trivial_f1(y, weights=w), M.trivial_f1(y[rep]), atol=1e-12)
    # and sklearn's own sample_weight agrees
    for k in range(3):
        assert M.auroc(y, s, weights=w)[k] == pytest.approx(roc_auc_score(y[:, k], s[:, k], sample_weight=w))


def test_batched_weights_give_one_row_per_resample():
    y, s = _data(n=50)
    w = np.random.default_rng(2).integers(0, 3, size=(4, 50))
    out = M.auroc(y, s, weights=w)
    assert out.shape == (4, 3)
    for b in range(4):
        np.testing.assert_allclose(out[b], M.auroc(y, s, weights=w[b]))


def test_f1_matches_sklearn_including_zero_division():
    y, s = _data()
    thr = np.array([0.4, 0.5, 0.6])
    for k in range(3):
        expect = f1_score(y[:, k], s[:, k] >= thr[k], zero_division=0)
        assert M.f1_at(y, s, thr)[k] == pytest.approx(expect)
    # nothing positive, nothing predicted -> 0 (sklearn zero_division=0)
    assert M.f1_at(np.zeros((4, 1)), np.zeros((4, 1)), 0.5)[0] == 0.0


def test_threshold_is_inclusive():
    # score exactly at the threshold is a positive call
    c = M.confusion([[1], [0]], [[0.5], [0.2]], 0.5)
    assert (c["tp"][0], c["fp"][0], c["fn"][0], c["tn"][0]) == (1, 0, 0, 1)


def test_one_class_label_gives_nan_not_a_number():
    y = np.array([[0, 1], [0, 0], [0, 1]])
    s = np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.8]])
    assert np.isnan(M.auroc(y, s)[0]) and M.auroc(y, s)[1] == 1.0
    assert np.isnan(M.average_precision(y, s)[0])


def test_confusion_rates_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0])[:, None]
    s = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.1, 0.3])[:, None]
    c = M.confusion(y, s, 0.5)  # TP=2 FN=1 FP=1 TN=3
    assert [c[k][0] for k in ("tp", "fp", "fn", "tn")] == [2, 1, 1, 3]
    r = M.rates_from_counts(c)
    assert r["sensitivity"][0] == pytest.approx(2 / 3)
    assert r["specificity"][0] == pytest.approx(3 / 4)
    assert r["ppv"][0] == pytest.approx(2 / 3)
    assert r["npv"][0] == pytest.approx(3 / 4)
    assert M.f1_at(y, s, 0.5)[0] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_trivial_f1_by_hand():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])[:, None]  # P=2, N=10
    assert M.trivial_f1(y)[0] == pytest.approx(2 * 2 / (10 + 2))
    assert M.trivial_f1(y)[0] == pytest.approx(f1_score(y[:, 0], np.ones(10)))


def test_tuned_threshold_is_midpoint_and_max_f1():
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.1])
    # candidates: >=0.9 F1=2/4; >=0.8 F1=4/5; >=0.7 4/6; >=0.6 6/7 (best); >=0.3 6/8; all 6/9
    thr, f1 = M.best_f1_threshold(y, s)
    assert f1 == pytest.approx(6 / 7)
    assert thr == pytest.approx(0.45)  # midpoint of 0.6 (last positive call) and 0.3
    assert M.f1_at(y[:, None], s[:, None], thr)[0] == pytest.approx(6 / 7)


def test_tuned_threshold_brute_force_agrees_with_sklearn_f1():
    y, s = _data(n=150, ties=True, seed=5)
    thr = M.tune_thresholds(y, s)
    for k in range(3):
        best = max(f1_score(y[:, k], s[:, k] >= c, zero_division=0) for c in np.unique(s[:, k]))
        assert f1_score(y[:, k], s[:, k] >= thr[k]) == pytest.approx(best)


def test_tuned_threshold_all_positive_choice_and_degenerate_labels():
    # every image positive is best -> threshold is the lowest score itself
    thr, f1 = M.best_f1_threshold([1, 1, 1, 0], [0.9, 0.8, 0.1, 0.5])
    assert f1 == pytest.approx(2 * 3 / (2 * 3 + 1)) and thr == pytest.approx(0.1)
    # no positives -> documented fallback
    assert M.tune_thresholds(np.zeros((5, 1)), np.linspace(0, 1, 5)[:, None])[0] == M.DEGENERATE_THRESHOLD


def test_adjacent_floats_keep_the_positive_side():
    a = 0.5
    b = np.nextafter(a, 0)
    thr, f1 = M.best_f1_threshold([1, 0], [a, b])
    assert f1 == 1.0 and M.f1_at([[1], [0]], [[a], [b]], thr)[0] == 1.0


def test_calibration_bins_and_ece():
    y = np.array([0, 1, 1, 1])
    s = np.array([0.05, 0.95, 0.95, 0.95])
    b = M.calibration_bins(y, s, n_bins=10)
    assert b["count"][0] == 1 and b["count"][9] == 3 and b["observed"][9] == 1.0
    assert M.expected_calibration_error(y, s) == pytest.approx((0.05 * 1 + 0.05 * 3) / 4)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="differ in shape"):
        M.f1_at(np.zeros((3, 2)), np.zeros((3, 1)), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.zeros((2, 1)), np.array([[np.nan], [0.1]]))


def test_curves_match_sklearn():
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, s = _data(n=80, ties=True, seed=7)
    fpr, tpr, _ = M.roc_curve(y[:, 1], s[:, 1])
    efpr, etpr, _ = roc_curve(y[:, 1], s[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    rec, prec, thr = M.pr_curve(y[:, 1], s[:, 1])
    eprec, erec, ethr = precision_recall_curve(y[:, 1], s[:, 1])
    # sklearn lists thresholds ascending and appends the (recall 0, precision 1) end point
    np.testing.assert_allclose(prec, eprec[:-1][::-1])
    np.testing.assert_allclose(rec, erec[:-1][::-1])
    np.testing.assert_allclose(thr, ethr[::-1])
