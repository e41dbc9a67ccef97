"""strategy: linear_probe -- frozen backbone, cross-fitted logistic head, an ordinary bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrvit.training import linear_probe
from cxrvit.training.config import load_recipe
from cxrvit.training.engine import train

#: The probe recipe on a tiny ViT with DINO's random positions (what these tests ran as baseline + strategy=linear_probe
#: before issue 21 made a recipe hold only the sections its strategy reads).
PROBE_RECIPE = "probe-random"
PROBE = ["model.arch=vit_tiny", "model.img_size=32", "model.pos_embed=random", "probe.c_grid=[0.1,1.0]",
         "probe.cv_folds=3"]


def _rows(cache):
    from cxrvit.training.commands import choose_rows

    return choose_rows(cache, 0.15, 0)[:2]


def test_folded_head_equals_standardised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from cxrvit.training.linear_probe import fit_head

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [0.5, 2.0, 10.0, 1.0], size=(200, 4))
    y = np.stack([(x[:, 0] + rng.normal(0, 0.3, 200) > 3).astype(float),
                  (x[:, 2] + rng.normal(0, 5, 200) > 5).astype(float)], 1)
    w, b = fit_head(x, y, c=0.5)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    for j in range(2):
        ref = LogisticRegression(C=0.5, max_iter=10000, tol=1e-10).fit(z, y[:, j]).decision_function(z)
        np.testing.assert_allclose(x @ w[j] + b[j], ref, rtol=1e-5, atol=1e-5)


def _hard_problem(n, d, seed):
    """Correlated, offset features (as CLS features are) and labels from rare to common, a weak signal."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.1 + rng.normal(size=d) * 3
    y = (rng.random((n, 4)) < [0.03, 0.1, 0.3, 0.5]).astype(float)
    x[:, :4] += 0.5 * y
    return x, y


def test_newton_reaches_its_gradient_tolerance_on_an_ill_conditioned_fit(monkeypatch):
    """Fewer rows than features at C = 1 (nearly separable): the conjugate-gradient steps must still reach
    the stated optimum, and both preconditioners (the shared Gram one, a label's own Hessian) must run."""
    from cxrvit.training import linear_probe as lp

    x, y = _hard_problem(120, 160, seed=2)
    z, mean, std = lp._standardise(x)
    np.testing.assert_array_equal(z[:, :-1], (x - mean) / std)     # the same standardisation as before
    assert np.all(z[:, -1] == 1.0)
    used_exact = []
    real = lp._newton_directions
    monkeypatch.setattr(lp, "_newton_directions", lambda *a, **k: used_exact.append(bool(a[6])) or real(*a, **k))
    c = 1.0
    theta = lp._logistic_newton(z, y, c)
    p = 1 / (1 + np.exp(-(z @ theta.T)))
    ridge = np.r_[np.ones(x.shape[1]), 0.0]
    grad = c * (p - y).T @ z + theta * ridge
    assert np.abs(grad).max() < 1e-9 * max(1.0, c * len(x))
    assert any(used_exact) and not used_exact[0]


def test_c_path_with_warm_starts_equals_each_c_fitted_alone():
    """cross_fit_path shares one standardisation per fold and warm-starts each C from the previous one;
    the optimum is unique, so every C's out-of-fold probabilities are those of a cold fit at that C,
    returned in the grid's own (unsorted) order."""
    from cxrvit.training.linear_probe import cross_fit_path

    x, y = _hard_problem(300, 24, seed=3)
    rows = np.arange(300) * 2
    patients = np.repeat(np.arange(150), 4)          # indexed by row: two rows per patient here
    grid = [1.0, 0.01, 0.1]
    path = cross_fit_path(x, rows, y, rows, x, y, patients, grid, 5, 0)
    for c, oof in zip(grid, path):
        alone = cross_fit_path(x, rows, y, rows, x, y, patients, [c], 5, 0)[0]
        np.testing.assert_allclose(oof, alone, rtol=0, atol=1e-8)
    assert not np.allclose(path[0], path[1])


def test_one_class_label_gets_a_finite_prior_bias():
    from cxrvit.training.linear_probe import fit_head

    x = np.random.default_rng(1).normal(size=(50, 3))
    w, b = fit_head(x, np.zeros((50, 1)), c=1.0)
    assert np.all(w == 0) and np.isfinite(b[0]) and b[0] < -3


@pytest.mark.parametrize("pool,blocks", [("token", 1), ("avg", 1), ("avg", 3), ("avgmax", 2),
                                        ("token+avg", 1)])
def test_probe_bundle_scores_as_fitted_and_thresholds_are_cross_fitted(tiny_cache, tmp_path, one_thread, pool,
                                                                       blocks):
    from cxrvit.data.preprocess import Preprocessing
    from cxrvit.evaluation.evaluate import predict_rows
    from cxrvit.inference.bundle import load_bundle
    from cxrvit.training.engine import train
    from cxrvit.training.linear_probe import head_features

    cfg = load_recipe(PROBE_RECIPE, PROBE + [f"model.global_pool={pool}", f"model.n_last_blocks={blocks}"])
    tr, va = _rows(tiny_cache)
    out = train(cfg, tiny_cache, tr, va, tmp_path / "run", progress=False)
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["global_pool"] == pool and meta["n_last_blocks"] == blocks
    assert meta["preprocessing"]["source_size"] == tiny_cache.size   # predict squares files as the cache did
    rows = np.sort(np.concatenate([tr, va]))
    names = set(tiny_cache.index["image"].to_numpy()[rows].astype(str))
    # Every training image (train and validation rows) tuned the thresholds; none of the test split did.
    assert meta["threshold_source"]["split"] == "cross-fitted"
    assert set(meta["threshold_source"]["images"]) == names
    # ... and their patients, so scoring another cache with other films of them is caught (evaluate's guard)
    assert meta["threshold_source"]["patients"] == sorted(set(tiny_cache.patient_ids[rows].astype(str)))
    assert meta["training"]["C"] in (0.1, 1.0) and len(meta["training"]["c_search"]) == 2
    assert [json.loads(line)["C"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0.1, 1.0]

    # The bundle is an ordinary DINO-layout ViT whose head maps the frozen CLS features exactly as fitted.
    bundle = load_bundle(out)
    width = blocks * bundle.model.embed_dim * (1 if pool in ("token", "avg") else 2)
    assert bundle.model.global_pool == pool and bundle.model.head.in_features == width
    test = np.setdiff1d(np.arange(len(tiny_cache)), rows)
    probs = predict_rows(bundle, tiny_cache, test)
    feats = head_features(bundle.model, tiny_cache, test, 32, Preprocessing(size=32))
    w = bundle.model.head.weight.detach().double().numpy()
    b = bundle.model.head.bias.detach().double().numpy()
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-(feats @ w.T + b))), atol=1e-5)
    # The backbone is the seed's random initialisation, untouched.
    from cxrvit.model.vit import build_model
    torch.manual_seed(cfg.engine.seed)
    fresh = build_model("vit_tiny", num_classes=len(cfg.data.labels))
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, bundle.model.blocks[0].attn.qkv.weight.cpu())


def test_resume_reuses_features_and_refits_a_new_grid(tiny_cache, tmp_path, one_thread, monkeypatch):
    from cxrvit.training import probe_features
    from cxrvit.training.engine import train

    tr, va = _rows(tiny_cache)
    train(load_recipe(PROBE_RECIPE, PROBE), tiny_cache, tr, va, tmp_path / "run", progress=False)
    monkeypatch.setattr(probe_features, "extract_features",
                        lambda *a, **k: pytest.fail("features were extracted again"))
    cfg = load_recipe(PROBE_RECIPE, PROBE[:-2] + ["probe.c_grid=[0.05]", "probe.cv_folds=3"])
    out = train(cfg, tiny_cache, tr, va, tmp_path / "run", resume=True, progress=False)
    assert json.loads((out / "bundle.json").read_text())["training"]["C"] == 0.05
    # Without resume a finished probe is never overwritten.
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, tiny_cache, tr, va, tmp_path / "run", progress=False)
    # A different image size is different features: they are extracted again, not reused.
    with pytest.raises(pytest.fail.Exception, match="extracted again"):
        train(load_recipe(PROBE_RECIPE, PROBE + ["model.img_size=48"]), tiny_cache, tr, va, tmp_path / "run",
              resume=True, progress=False)
    # So is another starting backbone (sin-cos instead of random positions).
    with pytest.raises(pytest.fail.Exception, match="extracted again"):
        train(load_recipe(PROBE_RECIPE, PROBE + ["model.pos_embed=sincos"]), tiny_cache, tr, va, tmp_path / "run",
              resume=True, progress=False)


def test_probe_finds_a_signal_the_features_carry(tiny_cache, tmp_path, one_thread):
    """Labels that follow image brightness: frozen random features carry it, the probe must find it."""
    from cxrvit.training.linear_probe import fit_linear_probe

    class Relabelled:
        def __init__(self, cache):
            self.pixels, self.index, self.patient_ids, self.size = cache.pixels, cache.index, cache.patient_ids, cache.size
            bright = np.asarray(cache.pixels, dtype=np.float64).mean((1, 2))
            self.y = (bright > np.median(bright)).astype(np.float32)

        def labels(self, names):
            return np.repeat(self.y[:, None], len(names), 1)

    cache = Relabelled(tiny_cache)
    tr, va = _rows(tiny_cache)
    out = fit_linear_probe(load_recipe(PROBE_RECIPE, PROBE), cache, tr, va, tmp_path / "run", progress=False)
    assert json.loads((out / "bundle.json").read_text())["training"]["oof_mean_auroc_scored"] > 0.8


@pytest.mark.parametrize("override, key", [("strategy=lora", "strategy"), ("probe.cv_folds=1", "probe.cv_folds"),
                                           ("probe.c_grid=[]", "probe.c_grid"), ("probe.views=0", "probe.views")])
def test_bad_probe_settings_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_recipe(PROBE_RECIPE, [override]).validate()


def test_lp_ft_fine_tunes_from_the_probe_fitted_on_training_rows_only(tiny_cache, tmp_path, one_thread):
    from safetensors.torch import load_file

    from cxrvit.training.engine import train
    from trainhelp import TINY

    # lr 0: fine-tuning cannot move the weights, so the final model must be the probe's exactly.
    cfg = load_recipe("baseline", TINY + ["strategy=lp_ft", "schedule.epochs=1", "optim.lr=0", "optim.min_lr=0",
                                          "probe.cv_folds=3", "probe.c_grid=[0.1]"])
    tr, va = _rows(tiny_cache)
    out = train(cfg, tiny_cache, tr, va, tmp_path / "run", progress=False)
    probe_meta = json.loads((out / "probe" / "bundle.json").read_text())
    names = tiny_cache.index["image"].to_numpy().astype(str)
    assert set(probe_meta["threshold_source"]["images"]) == set(names[tr])    # validation rows kept out
    assert json.loads((out / "bundle.json").read_text())["threshold_source"]["split"] == "val"
    final, probe = load_file(str(out / "model.safetensors")), load_file(str(out / "probe" / "model.safetensors"))
    assert final.keys() == probe.keys() and all(torch.equal(final[k], probe[k]) for k in final)


def test_probe_strategies_refuse_torchrun(tiny_cache, tmp_path, monkeypatch):
    from cxrvit.training.engine import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    for strategy in ("linear_probe", "lp_ft"):
        with pytest.raises(ValueError, match="without torchrun"):
            train(load_recipe(PROBE_RECIPE, PROBE[:2] + [f"strategy={strategy}"]), tiny_cache, *_rows(tiny_cache),
                  tmp_path / strategy, progress=False)
    assert not (tmp_path / "linear_probe").exists()


def test_recipe_model_init_is_the_start_unless_init_is_given(tiny_cache, tmp_path, one_thread, monkeypatch):
    """``model.init`` (how `improved` names its learned backbone) is loaded when no --init is given, read from
    the current directory; an explicit init replaces it; a recipe file that is not there is an error naming it."""
    from cxrvit.inference.bundle import load_bundle
    from cxrvit.ssl.encoder import build_encoder, export_backbone
    from cxrvit.training.engine import train

    torch.manual_seed(7)
    export_backbone(build_encoder("vit_tiny", depth=12), tmp_path / "bb" / "backbone.safetensors", arch="vit_tiny",
                    method="mae", cls_token="test")
    monkeypatch.chdir(tmp_path)
    tr, va = _rows(tiny_cache)
    cfg = load_recipe(PROBE_RECIPE, PROBE + ["model.init=bb/backbone.safetensors"])
    via_recipe = load_bundle(train(cfg, tiny_cache, tr, va, tmp_path / "a", progress=False))
    plain = load_recipe(PROBE_RECIPE, PROBE)
    via_init = load_bundle(train(plain, tiny_cache, tr, va, tmp_path / "b", init="bb/backbone.safetensors",
                                 progress=False))
    for a, b in zip(via_recipe.model.state_dict().values(), via_init.model.state_dict().values()):
        assert torch.equal(a, b)
    # an explicit init wins over the recipe's (here: a missing recipe file is never opened)
    gone = load_recipe(PROBE_RECIPE, PROBE + ["model.init=nowhere/backbone.safetensors"])
    over = load_bundle(train(gone, tiny_cache, tr, va, tmp_path / "c", init="bb/backbone.safetensors",
                             progress=False))
    assert torch.equal(over.model.blocks[0].attn.qkv.weight, via_init.model.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match=r"model.init=nowhere/backbone.safetensors.*--init FILE"):
        train(gone, tiny_cache, tr, va, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()    # refused before anything is written


def test_a_torn_features_file_is_extracted_again_and_a_killed_write_leaves_none(tiny_cache, tmp_path, one_thread,
                                                                                  monkeypatch, capsys):
    tr, va = _rows(tiny_cache)
    cfg, run = load_recipe(PROBE_RECIPE, PROBE), tmp_path / "run"
    train(cfg, tiny_cache, tr, va, run, progress=False)
    feats = run / linear_probe.FEATURES
    with np.load(feats) as z:
        first = z["feats"]
    feats.write_bytes(feats.read_bytes()[:1000])          # what a kill during a write in place left
    train(cfg, tiny_cache, tr, va, run, resume=True, progress=False)
    assert f"{feats} is unreadable (BadZipFile" in capsys.readouterr().err
    with np.load(feats) as z:
        assert np.array_equal(z["feats"], first)          # extracted again, the same features

    def killed_midway(path, **arrays):
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("killed")

    feats.unlink()
    monkeypatch.setattr(linear_probe.np, "savez", killed_midway)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, tiny_cache, tr, va, run, resume=True, progress=False)
    # No torn file, no temporary; only the (empty) chunk folder of the pass, for the next --resume to continue
    assert sorted(p.name for p in run.glob("features*")) == [linear_probe.PARTIAL]
    assert sorted(p.name for p in (run / linear_probe.PARTIAL).iterdir()) == ["manifest.json"]


def test_an_out_of_fold_score_never_sees_its_own_label():
    """Cross-fitting's promise: a row's out-of-fold probability comes from a head fitted without that row.
    Flip the labels of one patient fold's rows: their own scores stay exactly as they were (only heads
    of other folds used them), while the other rows' scores move."""
    from cxrvit.data import splits
    from cxrvit.training.linear_probe import cross_fit_path

    x, y = _hard_problem(240, 12, seed=4)
    rows = np.arange(240) * 3
    patients = np.repeat(np.arange(80), 9)             # indexed by row: three rows per patient
    grid = [0.1, 1.0]
    before = cross_fit_path(x, rows, y, rows, x, y, patients, grid, 4, 0)
    _, held = splits.patient_kfold(rows, patients, k=4, seed=0)[1]
    pos = np.searchsorted(rows, held)
    flipped = y.copy()
    flipped[pos] = 1.0 - flipped[pos]
    after = cross_fit_path(x, rows, flipped, rows, x, flipped, patients, grid, 4, 0)
    others = np.setdiff1d(np.arange(len(rows)), pos)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[pos], b[pos])
        assert np.abs(a[others] - b[others]).max() > 1e-3


def test_the_bundle_keeps_the_best_c_and_thresholds_tuned_on_its_out_of_fold_scores(tiny_cache, tmp_path,
                                                                                    one_thread):
    """Recomputed from the run's own features: each C's recorded score is the scored labels' mean out-of-fold
    AUROC, the bundle's C is the best of them, and its thresholds are tuned on that C's out-of-fold
    probabilities (not on the final head's in-sample ones, which would flatter F1)."""
    from cxrvit.evaluation.metrics import auroc, tune_thresholds
    from cxrvit.inference.bundle import load_bundle
    from cxrvit.training.linear_probe import cross_fit_path

    cfg = load_recipe(PROBE_RECIPE, PROBE + ["probe.c_grid=[0.01,0.1,1.0]"])
    tr, va = _rows(tiny_cache)
    out = train(cfg, tiny_cache, tr, va, tmp_path / "run", progress=False)
    meta = json.loads((out / "bundle.json").read_text())
    with np.load(out / "features.npz") as z:
        rows, feats = z["rows"], z["feats"]
    labels = list(cfg.data.labels)
    y = tiny_cache.labels(labels).astype(np.float64)[rows]
    k = meta["threshold_source"]["folds"]
    oofs = cross_fit_path(feats, rows, y, rows, feats, y, tiny_cache.patient_ids, cfg.probe.c_grid, k,
                          cfg.data.split_seed)
    scored = [labels.index(s) for s in cfg.scored_labels]
    scores = [float(np.nanmean(auroc(y, oof)[scored])) for oof in oofs]
    search = meta["training"]["c_search"]
    np.testing.assert_allclose([s["score"] for s in search], scores, rtol=0, atol=1e-12)
    best = int(np.argmax(scores))
    assert len(set(np.round(scores, 9))) == len(scores)      # no tie: the argmax is the one choice
    assert meta["training"]["C"] == cfg.probe.c_grid[best]
    assert meta["training"]["oof_mean_auroc_scored"] == pytest.approx(scores[best], abs=1e-12)
    expected = tune_thresholds(y, oofs[best])
    bundle = load_bundle(out)
    np.testing.assert_allclose([bundle.thresholds[n] for n in labels], expected, rtol=0, atol=1e-12)
    # the in-sample alternative really differs here, so the check above can tell them apart
    w = bundle.model.head.weight.detach().double().numpy()
    b = bundle.model.head.bias.detach().double().numpy()
    in_sample = tune_thresholds(y, 1 / (1 + np.exp(-(feats @ w.T + b))))
    assert not np.allclose(in_sample[scored], expected[scored])
