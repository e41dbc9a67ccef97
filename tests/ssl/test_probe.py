import numpy as np
import pytest

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


def test_features_come_back_in_the_callers_row_order_cls_and_patch_mean(tiny_cache):
    """Unsorted rows across several batches give, row for row, what the encoder gives each image alone:
    the final-norm CLS token and the mean of the patch tokens."""
    import torch

    from cxrvit.data.preprocess import eval_transform
    from cxrvit.ssl.encoder import encode
    from cxrvit.ssl.probe import extract_features

    torch.manual_seed(0)
    vit = build_encoder("vit_tiny", depth=1, patch_size=8)
    pre = Preprocessing(size=32)
    rows = np.random.default_rng(1).permutation(len(tiny_cache))[:13]
    cls, mean = extract_features(vit, tiny_cache.pixels, rows, 32, pre, batch_size=5)
    vit.eval()
    for i, r in enumerate(rows):
        grey = torch.from_numpy(np.ascontiguousarray(tiny_cache.pixels[[r]])).unsqueeze(1)
        with torch.no_grad():
            tokens = encode(vit, pre.normalize(eval_transform(grey, 32))).float()[0]
        np.testing.assert_allclose(cls[i], tokens[0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean[i], tokens[1:].mean(0).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(cls, mean, atol=1e-3)


def test_run_probes_scores_each_feature_kind_with_its_own_probe(tiny_cache):
    """run_probes = extract_features, then knn_scores / linear_scores on the matching feature kind, then
    sklearn's AUROC per label on the validation rows, and the mean over labels."""
    import torch
    from sklearn.metrics import roc_auc_score

    from cxrvit.ssl.probe import extract_features

    torch.manual_seed(0)
    vit = build_encoder("vit_tiny", depth=1, patch_size=8)
    pre = Preprocessing(size=32)
    names = ("No Finding", "Infiltration")
    rows = np.random.default_rng(2).permutation(len(tiny_cache))
    probe = ProbeSet(tiny_cache, rows[:40], rows[40:], labels=names)
    y = tiny_cache.labels(list(names))
    assert all(0 < y[rows[40:], j].sum() < len(rows) - 40 for j in range(2))   # both labels have an AUROC
    out = run_probes(vit, probe, 32, pre, k=5)
    tr = extract_features(vit, tiny_cache.pixels, probe.train_rows, 32, pre)
    va = extract_features(vit, tiny_cache.pixels, probe.val_rows, 32, pre)
    ty, vy = y[probe.train_rows], y[probe.val_rows]
    for f, kind in enumerate(("cls", "mean")):
        for name, scores in (("knn", knn_scores(tr[f], ty, va[f], 5)), ("linear", linear_scores(tr[f], ty, va[f]))):
            aucs = [roc_auc_score(vy[:, j], scores[:, j]) for j in range(2)]
            for j, label in enumerate(names):
                assert out[f"{name}_{kind}/{label}"] == pytest.approx(aucs[j], abs=1e-9)
            assert out[f"{name}_{kind}_auroc"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert out["linear_cls_auroc"] != out["linear_mean_auroc"]
