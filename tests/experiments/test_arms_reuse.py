"""`cxrvit bench arms` reuse is tied to what made the predictions: the cache, the init file's content, the
training share and pre-training stage; OUTs made before these were recorded are still re-scored."""
import shutil

import numpy as np
import pytest
import yaml

from cxrvit.experiments.arms import run_arms
from cxrvit.experiments.crossval import load_fold, save_fold
from cxrvit.experiments.plan import load_plan
from armsfakes import QUIET, RecordingTrain, write_plan
from evalfakes import FakeCache

ARMS = [{"name": "baseline", "recipe": "baseline"}, {"name": "improved", "recipe": "probe-random"}]


def _plan(tmp_path, arms=ARMS):
    return load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms))


def _edit_identity(out, edit):
    path = out / "identity.yaml"
    saved = yaml.safe_load(path.read_text())
    edit(saved)
    path.write_text(yaml.safe_dump(saved, sort_keys=False))


def test_a_cache_with_other_pixels_is_refused_after_a_first_run(tmp_path):
    cache, fake = FakeCache(n_patients=12, seed=9), RecordingTrain()
    run_arms(_plan(tmp_path), "first-cache", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    recorded = yaml.safe_load((tmp_path / "b" / "identity.yaml").read_text())["cache"]
    assert recorded["n"] == len(cache) and recorded["size"] == cache.size and recorded["sha256"]
    inverted = FakeCache(n_patients=12, seed=9)
    inverted.pixels = 255 - inverted.pixels                    # the same images and rows, other pixels
    with pytest.raises(ValueError, match=r"run on the cache first-cache; other-cache is another cache "
                                         r"\(sha256\.pixels: .*Use a new --out"):
        run_arms(_plan(tmp_path), "other-cache", tmp_path / "b", cache=inverted, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4
    run_arms(_plan(tmp_path), "moved-cache", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4                                # the same cache elsewhere: reused


def test_an_out_without_a_recorded_cache_is_rescored_without_training(tmp_path):
    cache, fake = FakeCache(n_patients=12, seed=9), RecordingTrain()
    run_arms(_plan(tmp_path), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    _edit_identity(tmp_path / "b", lambda saved: saved.pop("cache"))   # an OUT made before caches were recorded
    said = []
    res = run_arms(_plan(tmp_path), "C", tmp_path / "b", cache=cache, train_fn=fake, **{**QUIET, "log": said.append})
    assert len(fake.calls) == 4 and res is not None
    assert any("could not check" in m for m in said)
    assert "cache" not in yaml.safe_load((tmp_path / "b" / "identity.yaml").read_text())   # nothing vouched for


def test_an_init_file_with_other_content_is_refused(tmp_path):
    cache, fake = FakeCache(n_patients=12, seed=9), RecordingTrain()
    init = tmp_path / "backbone.pt"
    init.write_bytes(b"backbone v1")
    arms = ARMS[:1] + [{"name": "started", "recipe": "baseline", "init": str(init)}]
    run_arms(_plan(tmp_path, arms), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4
    # an identity recorded with the path only (before init files were hashed) is accepted
    _edit_identity(tmp_path / "b", lambda saved: saved["arms"]["started"].pop("init_sha256"))
    run_arms(_plan(tmp_path, arms), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4
    init.write_bytes(b"a different backbone v2")               # same path, other weights
    with pytest.raises(ValueError, match=rf"arm 'started' changed .*init file {init} is not the file it was run with"):
        run_arms(_plan(tmp_path, arms), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    # without the recorded hash, the one pinned in each fold's heldout.npz still refuses
    _edit_identity(tmp_path / "b", lambda saved: saved["arms"]["started"].pop("init_sha256"))
    with pytest.raises(ValueError, match=r"heldout\.npz: made for another arm \(init_sha256: "):
        run_arms(_plan(tmp_path, arms), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4


def test_an_arm_folder_copied_under_another_train_fraction_is_refused(tmp_path):
    cache, fake = FakeCache(n_patients=16, seed=9), RecordingTrain()
    run_arms(_plan(tmp_path), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    for f in (0, 1):
        shutil.copytree(tmp_path / "b" / f"fold{f}" / "baseline", tmp_path / "b" / f"fold{f}" / "baseline-q25")
    arms = ARMS + [{"name": "baseline-q25", "recipe": "baseline", "train_fraction": 0.25}]
    with pytest.raises(ValueError, match=r"made for another arm \(train_fraction: 1\.0 -> 0\.25\)"):
        run_arms(_plan(tmp_path, arms), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4
    # predictions saved before pins existed are accepted while identity.yaml agrees, as before
    for f in (0, 1):
        shutil.rmtree(tmp_path / "b" / f"fold{f}" / "baseline-q25")
        path = tmp_path / "b" / f"fold{f}" / "baseline" / "heldout.npz"
        fold, chash = load_fold(path)
        save_fold(path, fold, chash)
        assert "pins" not in np.load(path).files
    run_arms(_plan(tmp_path, arms), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 6                                # only the new 1/4 share trained
