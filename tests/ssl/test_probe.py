import numpy as np

from cxrvit.data.preprocess import Preprocessing
from cxrvit.ssl.encoder import build_encoder
from cxrvit.ssl.probe import ProbeSet, knn_scores, linear_scores, run_probes


def test_knn_and_linear_rank_a_separable_label_perfectly():
    rng = np.random.default_rng(0)
    y = (rng.random((80, 1)) < 0.4).astype(np.float32)
    x = rng.normal(size=(80, 16)).astype(np.float32)
    x[:, 0] += 4 * y[:, 0]                       # one feature carries the label
    tr, va = slice(0, 60), slice(60, 80)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y[va, 0], knn_scores(x[tr], y[tr], x[va], k=5)[:, 0]) > 0.95
    assert roc_auc_score(y[va, 0], linear_scores(x[tr], y[tr], x[va])[:, 0]) > 0.95


def test_run_probes_reports_per_label_and_mean_auroc(tiny_cache):
    rows = np.arange(len(tiny_cache))
    probe = ProbeSet(tiny_cache, rows[:32], rows[32:], labels=("No Finding", "Pneumonia"))
    vit = build_encoder("vit_tiny", depth=1, patch_size=8)
    out = run_probes(vit, probe, 32, Preprocessing(size=32), k=5)
    for kind in ("knn_cls", "knn_mean", "linear_cls", "linear_mean"):
        assert 0.0 <= out[f"{kind}_auroc"] <= 1.0
        assert f"{kind}/No Finding" in out
