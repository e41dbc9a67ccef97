"""`cxrvit train --resume RUN --set ...`: a probe's head settings refit on its kept features; nothing else changes."""
from __future__ import annotations

import json

import pytest
import yaml

from cxrvit.cli import main

PROBE = ["model.arch=vit_tiny", "model.img_size=32", "model.pos_embed=random", "probe.c_grid=[0.1,1.0]",
         "probe.cv_folds=2", "probe.views=1"]


def test_a_resumed_probe_refits_a_new_c_grid_on_its_kept_features(tiny_cache_dir, tmp_path, one_thread,
                                                                  monkeypatch, capsys):
    from cxrvit.training import probe_features

    run = tmp_path / "run"
    sets = [item for key in PROBE for item in ("--set", key)]
    assert main(["train", "--recipe", "probe-random", "--data", str(tiny_cache_dir), "--out", str(run),
                 "--no-progress", *sets]) == 0
    monkeypatch.setattr(probe_features, "extract_features",
                        lambda *a, **k: pytest.fail("features were extracted again"))
    # it used to refuse any --set on resume, so refitting meant hand-editing RUN/config.yaml
    assert main(["train", "--resume", str(run), "--no-progress", "--set", "probe.c_grid=[0.05]",
                 "--set", "probe.cv_folds=3"]) == 0
    assert json.loads((run / "bundle.json").read_text())["training"]["C"] == 0.05
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["probe"]["c_grid"] == [0.05] and saved["probe"]["cv_folds"] == 3
    capsys.readouterr()
    # anything the features depend on is the run's, refused naming the key, and the run is left as it was
    assert main(["train", "--resume", str(run), "--set", "model.img_size=48", "--set", "probe.c_grid=[1]"]) == 2
    err = capsys.readouterr().err
    assert "model.img_size cannot change on resume" in err and "probe.c_grid, probe.cv_folds" in err
    assert "probe.c_grid cannot" not in err
    assert yaml.safe_load((run / "config.yaml").read_text()) == saved
    assert main(["train", "--resume", str(run), "--recipe", "baseline"]) == 2
    assert "drop --recipe" in capsys.readouterr().err
