"""Pre-training stages an arm reads: one that continues another (``init_from``; order, folders, identity, cost,
bad plans), and finished stages whose files are not all there."""
import json

import pytest
import yaml

from cxrvit.experiments.arms import run_arms
from cxrvit.experiments.plan import load_plan, pretrain_identity
import cxrvit.ssl.pretrain as pretrain_mod
from armsfakes import QUIET, RecordingPretrain, RecordingTrain, write_plan
from evalfakes import FakeCache

STAGES = {"mae": {"method": "mae", "overrides": ["schedule.epochs=3"], "per_seed": True},
          "more": {"method": "mae", "overrides": ["schedule.epochs=2"], "per_seed": True, "init_from": "mae"}}
ARMS = [{"name": "baseline", "recipe": "baseline"}, {"name": "mae-probe", "recipe": "improved", "pretrain": "mae"},
        {"name": "more-probe", "recipe": "improved", "pretrain": "more"}]


def test_a_continued_stage_runs_after_its_parent_in_the_same_fold_and_seed_and_starts_from_its_last_pt(
        tmp_path, monkeypatch):
    cache = FakeCache(n_patients=12, seed=6)
    pretrainer = RecordingPretrain()
    monkeypatch.setattr(pretrain_mod, "pretrain", pretrainer)
    seen = lambda: [(out.relative_to(tmp_path / "b").as_posix(), cfg.schedule.epochs, cfg.init)  # noqa: E731
                    for out, cfg in pretrainer.calls]
    # Only the continued arm: its parent stage runs first all the same (the arm reading it never does).
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[1], pretrain=STAGES, arms=ARMS))
    run_arms(plan, "C", tmp_path / "b", only=["more-probe"], cache=cache, train_fn=RecordingTrain(), **QUIET)
    parent = tmp_path / "b" / "fold0" / "pretrain-mae-seed1" / "last.pt"
    assert seen()[:2] == [("fold0/pretrain-mae-seed1", 3, ""), ("fold0/pretrain-more-seed1", 2, str(parent))]
    assert len(seen()) == 4                                   # two folds, each parent once
    # The parent is reused, not run again, when its arm comes; the cost of the continued arm is both stages'.
    for f in (0, 1):
        for stage, s in (("mae", 600.0), ("more", 300.0)):
            cost = tmp_path / "b" / f"fold{f}" / f"pretrain-{stage}-seed1" / "cost.json"
            cost.write_text(json.dumps({**json.loads(cost.read_text()), "seconds": s}))
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), **QUIET)
    assert len(seen()) == 4
    assert res.cost_minutes["more-probe"]["pretrain"] == pytest.approx(2 * (600 + 300) / 60)
    assert res.cost_minutes["mae-probe"]["pretrain"] == pytest.approx(2 * 600 / 60)
    # Its monitor's first probe is where the parent ended, not a random init, and the table says so.
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| more (starts where mae ended) | " in md and "| mae | " in md
    # What it continues is part of what it is (by name; the parent's own identity is checked by its name).
    assert pretrain_identity(plan.pretrain["more"])["init_from"] == "mae"
    assert "init_from" not in pretrain_identity(plan.pretrain["mae"])


def test_a_continued_stage_whose_parent_kept_only_its_backbone_says_how_to_recover(tmp_path, monkeypatch):
    cache = FakeCache(n_patients=12, seed=6)

    def fake_pretrain(cfg, caches, out_dir, **kw):
        raise AssertionError("must not pre-train")

    monkeypatch.setattr(pretrain_mod, "pretrain", fake_pretrain)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[1], pretrain=STAGES, arms=ARMS))
    kept = tmp_path / "b" / "fold0" / "pretrain-mae-seed1"      # a stage copied back without its last.pt
    kept.mkdir(parents=True)
    (kept / "backbone.safetensors").write_bytes(b"weights")
    (kept / "cost.json").write_text(json.dumps({"seconds": 1.0, "steps": 3, "images": 6, "probes": []}))
    with pytest.raises(FileNotFoundError, match="pretrain-mae-seed1/last.pt is missing"):
        run_arms(plan, "C", tmp_path / "b", only=["more-probe"], cache=cache, train_fn=RecordingTrain(), **QUIET)


def test_a_finished_stage_copied_back_without_its_weights_is_refused_and_its_record_kept(tmp_path, monkeypatch):
    cache = FakeCache(n_patients=12, seed=6)
    pretrainer = RecordingPretrain()
    monkeypatch.setattr(pretrain_mod, "pretrain", pretrainer)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[1], pretrain=STAGES, arms=ARMS))
    kept = tmp_path / "b" / "fold0" / "pretrain-mae-seed1"      # what bench/results/collect.sh keeps of a stage
    kept.mkdir(parents=True)
    record = {"cost.json": json.dumps({"seconds": 1.0, "steps": 3, "images": 6, "probes": []}),
              "metrics.jsonl": '{"kind": "probe", "step": 0}\n'}
    for name, text in record.items():
        (kept / name).write_text(text)
    with pytest.raises(FileNotFoundError, match="pretrain-mae-seed1: pre-training 'mae' finished here") as exc:
        run_arms(plan, "C", tmp_path / "b", only=["mae-probe"], cache=cache, train_fn=RecordingTrain(), **QUIET)
    assert "backbone.safetensors is not there" in str(exc.value) and "delete cost.json" in str(exc.value)
    assert pretrainer.calls == [] and {p.name: p.read_text() for p in kept.iterdir()} == record
    # Deleting cost.json, as the message says, pre-trains it again.
    (kept / "cost.json").unlink()
    run_arms(plan, "C", tmp_path / "b", only=["mae-probe"], cache=cache, train_fn=RecordingTrain(), **QUIET)
    first, _ = pretrainer.calls[0]
    assert first == kept and (kept / "backbone.safetensors").is_file()


@pytest.mark.parametrize("stages, message", [
    ({"more": {"method": "mae", "init_from": "nope"}}, "continues 'nope', which is not defined"),
    ({"a": {"method": "mae", "init_from": "b"}, "b": {"method": "mae", "init_from": "a"}, "more": {"method": "mae"}},
     "init_from loops"),
    ({"dino": {"method": "dino"}, "more": {"method": "mae", "init_from": "dino"}}, "another method"),
    ({"mae": {"method": "mae", "train_fraction": 0.5}, "more": {"method": "mae", "init_from": "mae"}},
     "another method or train_fraction"),
])
def test_bad_continued_stages_are_refused_naming_the_file(tmp_path, stages, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"arms": [{"name": "baseline", "recipe": "baseline"},
                                             {"name": "x", "recipe": "improved", "pretrain": "more"}],
                                    "pretrain": stages}))
    with pytest.raises(ValueError, match=message) as exc:
        load_plan(path)
    assert str(path) in str(exc.value)
