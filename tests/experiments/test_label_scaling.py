"""Label scaling: a pre-training stage on all of a fold's training patients, read by arms with fewer labels."""
from pathlib import Path

import pytest

from cxrvit.experiments.arms import run_arms
from cxrvit.experiments.arms_table import scaling_curves
from cxrvit.experiments.plan import load_plan
import cxrvit.ssl.pretrain as pretrain_mod
from armsfakes import QUIET, RecordingPretrain, RecordingTrain, write_plan
from evalfakes import FakeCache

PRETRAIN = {"mae": {"method": "mae"}, "mae-q25": {"method": "mae", "train_fraction": 0.25}}
ARMS = [{"name": "baseline", "recipe": "baseline"},
        {"name": "baseline-q25", "recipe": "baseline", "train_fraction": 0.25},
        {"name": "mae-probe", "recipe": "probe-random", "pretrain": "mae"},
        {"name": "mae-probe-q25", "recipe": "probe-random", "pretrain": "mae-q25", "train_fraction": 0.25},
        {"name": "mae-probe-labels25", "recipe": "probe-random", "pretrain": "mae", "train_fraction": 0.25}]


def test_label_scaling_is_its_own_curve_ending_at_the_arm_that_reads_the_stage_at_its_share(tmp_path):
    plan = load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], pretrain=PRETRAIN, arms=ARMS))
    assert scaling_curves(plan) == {
        "baseline": [("baseline-q25", 0.25), ("baseline", 1.0)],
        "mae-probe": [("mae-probe-q25", 0.25), ("mae-probe", 1.0)],                  # data scaling: both stages
        "mae-probe (labels)": [("mae-probe-labels25", 0.25), ("mae-probe", 1.0)]}    # one stage, fewer labels


def test_a_label_scaling_arm_reads_the_full_stage_and_trains_its_head_on_its_share(tmp_path, monkeypatch):
    cache = FakeCache(n_patients=24, seed=11)
    stages, train = RecordingPretrain(), RecordingTrain()
    monkeypatch.setattr(pretrain_mod, "pretrain", stages)
    plan = load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], pretrain=PRETRAIN, arms=ARMS))
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=train, **QUIET)
    # one stage per fold and name: the labels25 arm shares the full stage with mae-probe, trains nothing more
    assert sorted(p.name for p, _ in stages.calls) == ["pretrain-mae", "pretrain-mae", "pretrain-mae-q25",
                                                       "pretrain-mae-q25"]
    rows = {(Path(c["dir"]).parent.parent.name, Path(c["dir"]).parent.name): set(c["fit"]) | set(c["val"])
            for c in train.calls}
    inits = {(Path(c["dir"]).parent.parent.name, Path(c["dir"]).parent.name): Path(c["init"]).parent.name
             for c in train.calls if c.get("init")}
    for fold in ("fold0", "fold1"):
        assert rows[(fold, "mae-probe-labels25")] == rows[(fold, "mae-probe-q25")] < rows[(fold, "mae-probe")]
        assert inits[(fold, "mae-probe-labels25")] == inits[(fold, "mae-probe")] == "pretrain-mae"
        assert inits[(fold, "mae-probe-q25")] == "pretrain-mae-q25"
    contrast = res.scaling_contrast["mae-probe (labels)"]
    assert contrast.curves == ("baseline", "mae-probe (labels)") and contrast.shares == ("0.25", "1")
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| mae-probe (labels) | 0.25 |" in md and "a curve marked (labels)" in md


def test_a_stage_that_sees_fewer_patients_than_its_arm_is_refused(tmp_path):
    path = write_plan(tmp_path / "bad.yaml", pretrain={"mae": {"method": "mae", "train_fraction": 0.5}},
                      arms=[{"name": "baseline", "recipe": "baseline"},
                            {"name": "x", "recipe": "probe-random", "pretrain": "mae"}])
    with pytest.raises(ValueError, match=r"arm 'x' trains on 1 of each fold's patients but its pre-training 'mae' "
                                         r"sees only 0.5") as exc:
        load_plan(path)
    assert str(path) in str(exc.value)
