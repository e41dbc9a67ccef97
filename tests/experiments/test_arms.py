"""`cxrvit bench arms`: N arms on the same folds and seeds, per-fold pre-training, stacking, resume."""
import json
from pathlib import Path
import re

import numpy as np
import pytest
import yaml

from cxrvit.experiments.arms import StageLock, run_arms
from cxrvit.experiments.plan import load_plan, pretrain_config, pretrain_identity, with_default_init
from cxrvit.fileio import owner_tag
import cxrvit.ssl.pretrain as pretrain_mod
from cxrvit.ssl.pretrain import PretrainResult
from cxrvit.training.config import recipe_path
from armsfakes import QUIET, TINY, RecordingPretrain, RecordingTrain, patients_of, write_plan
from evalfakes import FakeCache


def test_arms_share_folds_and_seeds_stack_and_resume(tmp_path):
    cache = FakeCache(n_patients=16, seed=3)
    plan = load_plan(write_plan(tmp_path / "arms.yaml"))
    fake = RecordingTrain()
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 3 * 2 * 2                       # arms x folds x seeds
    assert sorted({c["seed"] for c in fake.calls}) == [0, 1]
    # every arm trained on the same fit/val rows of a fold, whatever its seed
    by_fold = {}
    for c in fake.calls:
        fold = Path(c["dir"]).parent.parent.name
        by_fold.setdefault(fold, set()).add((tuple(c["fit"]), tuple(c["val"])))
    assert all(len(v) == 1 for v in by_fold.values()) and len(by_fold) == 2
    # seeds are stacked: each image is scored once per seed, patients are the bootstrap unit
    for arm in ("baseline", "improved", "low-lr"):
        assert res.scores[arm].n_images == 2 * len(cache)
        assert res.scores[arm].n_patients == len(set(cache.patient_ids))
    assert set(res.comparisons) == {"improved", "low-lr"}
    assert res.comparisons["improved"].names == ("baseline", "improved")
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| low-lr |" in md and "Trivial all-positive mean F1" in md
    assert res.identical_seeds == [] and "Seeds that changed nothing" not in md   # the fake's seeds 0, 1 differ
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["vs_reference"]["improved"]["a"] == "baseline"
    assert (tmp_path / "b" / "fold1" / "improved-seed1" / "heldout.npz").is_file()

    again = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 12                                # resumed: nothing retrained
    assert again.comparisons["improved"].diff_f1["mean"] == res.comparisons["improved"].diff_f1["mean"]


class KilledOnce(RecordingTrain):
    """The engine killed part-way through one fold's training: it leaves a checkpoint and no bundle. Asked
    again without resume it refuses, as ``training.engine.train`` refuses a folder that holds a run."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim, self.killed = victim, False

    def __call__(self, cfg, cache, train_rows, val_rows, out_dir, **kwargs):
        out = Path(out_dir)
        if (out / "last.pt").is_file() and not kwargs.get("resume"):
            raise FileExistsError(f"{out} holds a run; resume it")
        if out.parent.name == self.victim and not self.killed:
            self.killed = True
            out.mkdir(parents=True)
            (out / "last.pt").write_bytes(b"half a run")
            raise KeyboardInterrupt
        return super().__call__(cfg, cache, train_rows, val_rows, out_dir, **kwargs)


def test_a_killed_fold_is_resumed_from_its_checkpoint_and_nothing_finished_is_trained_again(tmp_path):
    cache = FakeCache(n_patients=16, seed=3)
    plan = load_plan(write_plan(tmp_path / "arms.yaml"))
    fake = KilledOnce("low-lr")
    with pytest.raises(KeyboardInterrupt):
        run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    done = [c["dir"] for c in fake.calls]
    assert len(done) == 2 and (tmp_path / "b" / "fold0" / "low-lr" / "run" / "last.pt").is_file()
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    again = fake.calls[2:]
    assert again[0]["dir"] == str(tmp_path / "b" / "fold0" / "low-lr" / "run") and again[0]["resume"]
    assert not {c["dir"] for c in again} & set(done)              # the two finished folds were not trained again
    assert len(fake.calls) == 12 and res.scores["low-lr"].n_images == 2 * len(cache)


def test_a_per_seed_stage_pre_trains_once_per_fold_and_seed_and_each_seed_reads_its_own(tmp_path, monkeypatch):
    """Without per_seed every seed of an arm reads one backbone per fold (a probe's seeds are then copies);
    with it the seeds vary the pre-training too, and seed 0 is the stage exactly as it runs alone."""
    cache = FakeCache(n_patients=12, seed=6)
    pretrainer = RecordingPretrain()
    monkeypatch.setattr(pretrain_mod, "pretrain", pretrainer)
    stages = {"once": {"method": "mae", "overrides": ["schedule.epochs=3"]},
              "each": {"method": "mae", "overrides": ["schedule.epochs=3"], "per_seed": True}}
    arms = [{"name": "baseline", "recipe": "baseline"}, {"name": "mae-once", "recipe": "improved", "pretrain": "once"},
            {"name": "mae-each", "recipe": "improved", "pretrain": "each"}]
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0, 2], pretrain=stages, arms=arms))
    base = pretrain_config(plan.pretrain["once"]).engine.seed
    fake = RecordingTrain()
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    seen = [(out.relative_to(tmp_path / "b").as_posix(), cfg.engine.seed) for out, cfg in pretrainer.calls]
    assert sorted(seen) == sorted([("fold0/pretrain-once", base), ("fold1/pretrain-once", base),
                                   ("fold0/pretrain-each", base), ("fold1/pretrain-each", base),
                                   ("fold0/pretrain-each-seed2", base + 2), ("fold1/pretrain-each-seed2", base + 2)])
    reads = {Path(c["dir"]).parent.relative_to(tmp_path / "b").as_posix(): c["init"] for c in fake.calls if c["init"]}
    assert reads["fold1/mae-once-seed2"].endswith("fold1/pretrain-once/backbone.safetensors")
    assert reads["fold1/mae-each"].endswith("fold1/pretrain-each/backbone.safetensors")
    assert reads["fold1/mae-each-seed2"].endswith("fold1/pretrain-each-seed2/backbone.safetensors")
    assert res.probes["each"]["linear_mean_auroc"] == pytest.approx([0.5, 0.6])    # mean over folds and seeds
    # per_seed is part of what the stage is, and left out of the identity at its default (older OUTs keep theirs)
    assert pretrain_identity(plan.pretrain["each"])["per_seed"] is True
    assert "per_seed" not in pretrain_identity(plan.pretrain["once"])
    stages["once"]["per_seed"] = True
    with pytest.raises(ValueError, match="pre-training 'once' changed"):
        run_arms(load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0, 2], pretrain=stages, arms=arms)),
                 "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)


def test_only_runs_a_subset_and_scores_when_complete(tmp_path):
    cache = FakeCache(n_patients=12, seed=4)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0]))
    fake = RecordingTrain()
    assert run_arms(plan, "C", tmp_path / "b", only=["improved"], cache=cache, train_fn=fake, **QUIET) is None
    assert len(fake.calls) == 2
    res = run_arms(plan, "C", tmp_path / "b", only=["baseline", "low-lr"], cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 6 and res is not None


def test_changed_shared_settings_or_arm_are_refused(tmp_path):
    cache = FakeCache(n_patients=12, seed=5)
    fake = RecordingTrain()
    run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0])), "C", tmp_path / "b", cache=cache,
             train_fn=fake, **QUIET)
    # the common overrides change what every arm trains: refused, naming an arm and the key
    with pytest.raises(ValueError, match=r"arm 'baseline' changed since it was run \(config\.optim\.lr: "):
        run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], overrides=TINY + ["optim.lr=1e-3"])), "C",
                 tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    changed = write_plan(tmp_path / "a.yaml", seeds=[0], arms=[
        {"name": "baseline", "recipe": "baseline"}, {"name": "improved", "recipe": "baseline"}])
    with pytest.raises(ValueError, match="arm 'improved' changed"):
        run_arms(load_plan(changed), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)


def test_pretraining_runs_per_fold_on_training_images_only(tmp_path, monkeypatch):
    cache = FakeCache(n_patients=12, seed=6)
    seen = []

    def Result(out):   # 90 s: the stage's own tally, every process of it (ssl.pretrain keeps it)
        return PretrainResult(out, out / "backbone.safetensors", 3, [], seconds=90.0)

    def fake_pretrain(cfg, caches, out_dir, rows=None, probe=None, resume=True, quiet=False):
        seen.append((Path(out_dir).parent.name, np.array(rows[0]), cfg.schedule.epochs))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "backbone.safetensors").write_bytes(b"weights")
        return Result(Path(out_dir))

    monkeypatch.setattr(pretrain_mod, "pretrain", fake_pretrain)
    path = write_plan(tmp_path / "arms.yaml", seeds=[0], pretrain={"mae": {"method": "mae",
                                                                            "overrides": ["schedule.epochs=3"]}},
                      arms=[{"name": "baseline", "recipe": "baseline"},
                            {"name": "mae+improved", "recipe": "improved", "pretrain": "mae"}])
    fake = RecordingTrain()
    res = run_arms(load_plan(path), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert [s[0] for s in seen] == ["fold0", "fold1"] and all(s[2] == 3 for s in seen)
    folds = res.info["folds"]
    assert folds == 2
    for fold_name, pre_rows, _ in seen:
        f = int(fold_name[-1])
        call = next(c for c in fake.calls if f"fold{f}/mae+improved" in c["dir"])
        assert call["init"].endswith(f"fold{f}/pretrain-mae/backbone.safetensors")
        # the pre-training images are this fold's training images: never the ones it scores
        assert set(pre_rows) == set(call["fit"]) | set(call["val"])
        held = np.load(tmp_path / "b" / f"fold{f}" / "mae+improved" / "heldout.npz")["rows"]
        assert not patients_of(cache, pre_rows) & patients_of(cache, held)
    assert res.cost_minutes["mae+improved"]["pretrain"] == pytest.approx(3.0)   # 2 folds x 90 s, as the stage says
    run_arms(load_plan(path), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(seen) == 2                                       # pre-training is reused, not rerun
    # results copied without their weights (bench/results/collect.sh): finished arms are read back and
    # their pre-training is not re-run to make weights nobody reads
    for f in (0, 1):
        (tmp_path / "b" / f"fold{f}" / "pretrain-mae" / "backbone.safetensors").unlink()
    again = run_arms(load_plan(path), "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(seen) == 2 and len(fake.calls) == 4
    assert again.comparisons["mae+improved"].diff_auroc["mean"] == res.comparisons["mae+improved"].diff_auroc["mean"]


@pytest.mark.parametrize("body, message", [
    ({"arms": [{"name": "baseline", "recipe": "baseline"}]}, "at least two arms"),
    ({"arms": [{"name": "a", "recipe": "baseline"}, {"name": "b", "recipe": "probe-random"}]}, "reference arm"),
    ({"arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "improved", "pretrain": "dino"}]},
     "not defined"),
    ({"arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "improved", "init": "/nope.pt"}]},
     "does not exist"),
    ({"arms": [{"name": "baseline", "recipe": "baseline", "colour": 1}, {"name": "x", "recipe": "probe-random"}]},
     "colour"),
    ({"epochs": 3, "arms": []}, "unknown keys"),
    ({"pretrain": {"mae": {"method": "mae", "per_seed": "yes"}},
      "arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "improved", "pretrain": "mae"}]},
     "per_seed must be true or false"),
    ({"pretrain": {"mae-seed1": {"method": "mae"}},
      "arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "improved", "pretrain": "mae-seed1"}]},
     "may not contain"),
    # a repeated seed used to fail only after training, as "the folds are not a partition"
    ({"seeds": [0, 1, 0], "arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "probe-random"}]},
     r"'seeds' repeats \[0\]"),
    ({"seeds": [0, "1"], "arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "probe-random"}]},
     r"non-negative integers; \['1'\]"),
    ({"seeds": [0, 1.5, True, -1], "arms": [{"name": "baseline", "recipe": "baseline"},
                                           {"name": "x", "recipe": "probe-random"}]},
     r"non-negative integers; \[1\.5, True, -1\]"),
    ({"seeds": 3, "arms": [{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "probe-random"}]},
     "non-empty list of integers, got 3"),
])
def test_bad_arms_files_name_the_file_and_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ValueError, match=message) as exc:
        load_plan(path)
    assert str(path) in str(exc.value)


def test_one_flag_starts_every_plain_arm_from_a_checkpoint(tmp_path):
    ckpt = tmp_path / "dino_deitsmall16_pretrain.pth"
    ckpt.write_bytes(b"x")
    path = write_plan(tmp_path / "arms.yaml", pretrain={"mae": {"method": "mae"}},
                      arms=[{"name": "baseline", "recipe": "baseline"},
                            {"name": "mae+improved", "recipe": "improved", "pretrain": "mae"}])
    plan = with_default_init(load_plan(path), str(ckpt))
    assert plan.arm("baseline").init == str(ckpt)
    assert plan.arm("mae+improved").init is None and plan.arm("mae+improved").pretrain == "mae"
    with pytest.raises(ValueError, match="no such file"):
        with_default_init(load_plan(path), str(tmp_path / "absent.pth"))


def test_a_changed_pretraining_recipe_is_refused(tmp_path):
    cache = FakeCache(n_patients=12, seed=7)
    fake = RecordingTrain()
    arms = [{"name": "baseline", "recipe": "baseline"}, {"name": "improved", "recipe": "probe-random"}]
    run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms,
                                  pretrain={"mae": {"method": "mae", "overrides": ["schedule.epochs=3"]}})),
             "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    with pytest.raises(ValueError, match="pre-training 'mae' changed"):
        run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms,
                                      pretrain={"mae": {"method": "mae", "overrides": ["schedule.epochs=4"]}})),
                 "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)


def test_run_folds_scores_a_patient_wise_hold_out_and_reuses_it_later(tmp_path):
    cache = FakeCache(n_patients=14, seed=8)
    fake = RecordingTrain()
    arms = [{"name": "baseline", "recipe": "baseline"}, {"name": "improved", "recipe": "probe-random"}]
    half = run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms, run_folds=[0])), "C",
                    tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 2 and half.info["scored_folds"] == [0]
    held = np.load(tmp_path / "b" / "fold0" / "baseline" / "heldout.npz")["rows"]
    assert half.scores["baseline"].n_images == len(held) < len(cache)
    assert "hold-out" in (tmp_path / "b" / "results.md").read_text()
    full = run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms)), "C", tmp_path / "b",
                    cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4 and full.scores["baseline"].n_images == len(cache)   # fold 0 reused
    with pytest.raises(ValueError, match="run_folds"):
        run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms, run_folds=[2])), "C",
                 tmp_path / "b", cache=cache, train_fn=fake, **QUIET)


def test_a_finished_arm_is_reused_while_its_resolved_config_is_unchanged(tmp_path):
    """Identity is the resolved config, not the text: comments, key order and an override that restates
    the recipe's value keep a finished arm; so does an OUT written before identity.yaml existed."""
    cache = FakeCache(n_patients=12, seed=9)
    fake = RecordingTrain()
    recipe = tmp_path / "mine.yaml"
    raw = yaml.safe_load(recipe_path("baseline").read_text())
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    arms = [{"name": "baseline", "recipe": "baseline"}, {"name": "mine", "recipe": str(recipe)}]
    run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms)), "C", tmp_path / "b", cache=cache,
             train_fn=fake, **QUIET)
    assert len(fake.calls) == 4

    recipe.write_text("# the same recipe, commented and reordered\n"
                      + yaml.safe_dump(dict(reversed(list(raw.items()))), sort_keys=True))
    restated = [{"name": "baseline", "recipe": "baseline", "overrides": [f"optim.lr={raw['optim']['lr']}"]},
                {"name": "mine", "recipe": str(recipe), "overrides": ["model.attention=auto"]}]   # the default
    plan = load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=restated))
    run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4                                 # nothing retrained
    saved = yaml.safe_load((tmp_path / "b" / "identity.yaml").read_text())
    assert "name" not in saved["arms"]["mine"]["config"]               # what a recipe is called is not what it trains
    assert "attention" not in saved["arms"]["mine"]["config"].get("model", {})

    (tmp_path / "b" / "identity.yaml").unlink()                 # an OUT from before identities: resolved from plan.yaml
    run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    assert len(fake.calls) == 4
    changed = [restated[0], {**restated[1], "overrides": ["model.attention=explicit"]}]
    with pytest.raises(ValueError, match=r"arm 'mine' changed since it was run \(config\.model\.attention: "
                                         r"'<default>' -> 'explicit'\)"):
        run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=changed)), "C", tmp_path / "b",
                 cache=cache, train_fn=fake, **QUIET)


def test_pretraining_stages_read_their_own_overrides_and_show_their_probes(tmp_path, monkeypatch):
    """Each stage carries its own overrides (what `--ssl-set METHOD:KEY=VALUE` did for bench/ssl_bench.py),
    and the first and last frozen-feature probe of every fold's stage reach the table."""
    cache = FakeCache(n_patients=12, seed=10)
    configs = []

    def Result(out, epochs):
        return PretrainResult(out, out / "backbone.safetensors", 3, seconds=60.0, history=[
            {"epoch": 0, "knn_cls_auroc": 0.5, "linear_mean_auroc": 0.5},
            {"epoch": epochs, "knn_cls_auroc": 0.5 + epochs / 100, "linear_mean_auroc": 0.6}])

    def fake_pretrain(cfg, caches, out_dir, rows=None, probe=None, resume=True, quiet=False):
        configs.append((Path(out_dir).name, cfg.method, cfg.schedule.epochs, cfg.schedule.batch_size))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "backbone.safetensors").write_bytes(b"weights")
        return Result(Path(out_dir), cfg.schedule.epochs)

    monkeypatch.setattr(pretrain_mod, "pretrain", fake_pretrain)
    plan = load_plan(write_plan(
        tmp_path / "arms.yaml", seeds=[0], folds=2,
        pretrain={"dino": {"method": "dino", "overrides": ["schedule.batch_size=64", "schedule.epochs=2"]},
                  "mae": {"method": "mae", "overrides": ["schedule.batch_size=64"]}},
        arms=[{"name": "baseline", "recipe": "baseline"}, {"name": "dino+improved", "recipe": "improved",
                                                          "pretrain": "dino"},
              {"name": "mae+improved", "recipe": "improved", "pretrain": "mae"}]))
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), **QUIET)
    dino = [c for c in configs if c[0] == "pretrain-dino"]
    mae = [c for c in configs if c[0] == "pretrain-mae"]
    assert len(dino) == len(mae) == 2 and all(c[2:] == (2, 64) for c in dino)
    assert all(c[3] == 64 and c[2] != 2 for c in mae)          # mae keeps its own recipe's epochs
    assert res.probes["dino"]["knn_cls_auroc"] == pytest.approx([0.5, 0.52])
    assert "| dino | 0.500 -> 0.520 |" in (tmp_path / "b" / "results.md").read_text()


def test_data_scaling_arms_train_on_nested_patient_shares_and_are_scored_on_the_same_patients(tmp_path):
    cache = FakeCache(n_patients=24, seed=11)
    fake = RecordingTrain()
    arms = [{"name": "baseline", "recipe": "baseline"},
            {"name": "baseline-q25", "recipe": "baseline", "train_fraction": 0.25},
            {"name": "baseline-q50", "recipe": "baseline", "train_fraction": 0.5},
            {"name": "improved", "recipe": "probe-random"},
            {"name": "improved-q25", "recipe": "probe-random", "train_fraction": 0.25}]
    res = run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms)), "C", tmp_path / "b",
                   cache=cache, train_fn=fake, **QUIET)
    seen = {}
    for c in fake.calls:
        fold, arm = Path(c["dir"]).parent.parent.name, Path(c["dir"]).parent.name
        seen[(fold, arm)] = set(c["fit"]) | set(c["val"])
    for fold in ("fold0", "fold1"):
        quarter, half, whole = (seen[(fold, a)] for a in ("baseline-q25", "baseline-q50", "baseline"))
        assert quarter < half < whole                        # nested shares of the fold's training images
        assert seen[(fold, "improved")] == whole
        held = np.load(tmp_path / "b" / fold / "baseline-q25" / "heldout.npz")["rows"]
        assert np.array_equal(held, np.load(tmp_path / "b" / fold / "baseline" / "heldout.npz")["rows"])
        assert not patients_of(cache, sorted(quarter)) & patients_of(cache, held)
    # two curves, each named after its full-share arm
    assert res.scaling == {"baseline": [("baseline-q25", 0.25), ("baseline-q50", 0.5), ("baseline", 1.0)],
                           "improved": [("improved-q25", 0.25), ("improved", 1.0)]}
    assert res.scaling_gain["baseline"].names == ("baseline-q25", "baseline")
    # improved's gain minus the reference curve's gain over the same shares (1/4 -> all), paired
    contrast = res.scaling_contrast["improved"]
    assert list(res.scaling_contrast) == ["improved"] and contrast.curves == ("baseline", "improved")
    assert contrast.shares == ("0.25", "1")
    gain = {c: res.scaling_gain[c].auroc["Effusion"][1] - res.scaling_gain[c].auroc["Effusion"][0]
            for c in ("baseline", "improved")}
    assert contrast.diff_auroc["Effusion"].value == pytest.approx(gain["improved"] - gain["baseline"])
    assert res.info["train_images"]["baseline-q25"] < res.info["train_images"]["baseline-q50"] \
        < res.info["train_images"]["baseline"]
    md = (tmp_path / "b" / "results.md").read_text()
    assert "Data scaling" in md and "| baseline | 0.25 |" in md and "| baseline | 0.25 -> 1 |" in md
    assert "Does a curve gain more than `baseline`'s?" in md and "| improved | 0.25 -> 1 |" in md
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["scaling"]["baseline"][0] == ["baseline-q25", 0.25]
    assert saved["scaling_contrast"]["improved"]["shares"] == ["0.25", "1"]
    # the share is part of what an arm is
    arms[1]["train_fraction"] = 0.3
    with pytest.raises(ValueError, match=r"arm 'baseline-q25' changed since it was run \(train_fraction"):
        run_arms(load_plan(write_plan(tmp_path / "a.yaml", seeds=[0], arms=arms)), "C", tmp_path / "b",
                 cache=cache, train_fn=fake, **QUIET)


@pytest.mark.parametrize("arm, pretrain, message", [
    ({"train_fraction": 0.0}, {}, "train_fraction must be a number in"),
    ({"train_fraction": 1.5}, {}, "train_fraction must be a number in"),
    ({"train_fraction": "1/4"}, {}, "train_fraction must be a number in"),
    ({"train_fraction": True}, {}, "train_fraction must be a number in"),
    ({}, {"mae": {"method": "mae", "train_fraction": 0}}, "pre-training 'mae': train_fraction must be a number"),
    ({"pretrain": "mae"}, {"mae": {"method": "mae", "train_fraction": 0.5}}, "its pre-training 'mae' sees only 0.5"),
])
def test_bad_training_shares_are_refused_with_the_file(tmp_path, arm, pretrain, message):
    path = write_plan(tmp_path / "bad.yaml", pretrain=pretrain,
                      arms=[{"name": "baseline", "recipe": "baseline"}, {"name": "x", "recipe": "improved", **arm}])
    with pytest.raises(ValueError, match=message) as exc:
        load_plan(path)
    assert str(path) in str(exc.value)


def test_a_stage_lock_refuses_a_second_worker_and_is_gone_when_the_stage_ends(tmp_path):
    folder = tmp_path / "fold0" / "pretrain-mae"
    with StageLock(folder):
        assert (folder / ".lock").read_text() == owner_tag()
        with pytest.raises(RuntimeError, match=re.escape(f"{folder}: process {owner_tag()} is running this stage; "
                                                         "give the other worker different --only arms")):
            StageLock(folder).__enter__()
    assert not (folder / ".lock").exists()
    with StageLock(folder):                                   # and can be taken again
        pass
