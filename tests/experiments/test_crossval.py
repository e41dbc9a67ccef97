"""The fold machinery under every arm, driven as `cxrvit bench recipes` drives it (a two-arm plan):
patient-disjoint folds, honest thresholds, pooling, resume."""
import json

import numpy as np
import pytest

from cxrvit.data.preprocess import Preprocessing
from cxrvit.evaluation import metrics as M
from cxrvit.evaluation.evaluate import predict_rows
from cxrvit.experiments.arms import run_arms
from cxrvit.experiments.crossval import FoldPredictions, choose_protocol, pool
from cxrvit.experiments.plan import recipes_plan
from cxrvit.inference.bundle import Bundle, save_bundle
from cxrvit.training.config import save_config
from evalfakes import FakeCache, tiny_model

TINY = ["model.arch=vit_tiny", "model.img_size=32", "schedule.epochs=1", "schedule.batch_size=16",
        "engine.checkpoint_every=0"]


class RecordingTrain:
    """Stands in for training.engine.train: an untrained vit_tiny whose thresholds are tuned on the
    validation rows it is given, written as a real bundle. Records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, cache, train_rows, val_rows, out_dir, device=None, resume=False, progress=True):
        self.calls.append((cfg.name, np.array(train_rows), np.array(val_rows)))
        labels = list(cfg.data.labels)
        model = tiny_model(len(labels), seed=len(self.calls) % 2)
        prep = Preprocessing(size=cfg.model.img_size)
        bundle = Bundle(model=model, labels=labels, thresholds={}, preprocessing=prep, arch="vit_tiny")
        probs = predict_rows(bundle, cache, val_rows)
        thr = M.tune_thresholds(cache.labels(labels)[val_rows], probs)
        names = cache.index["image"].to_numpy()[val_rows].tolist()
        bundle_dir = save_bundle(out_dir, model, labels, dict(zip(labels, thr.tolist())),
                                 Preprocessing(size=cfg.model.img_size), arch="vit_tiny",
                                 threshold_source={"split": "val", "images": names})
        save_config(cfg, out_dir / "config.yaml")    # as the engine saves it with every run
        return bundle_dir


def _patients(cache, rows):
    return set(np.asarray(cache.patient_ids)[rows].astype(str))


def run_recipes(out, cache, overrides=TINY, **kwargs):
    """What `cxrvit bench recipes --folds 2` runs: baseline (reference) vs probe-random, plots included."""
    plan = recipes_plan(["baseline", "probe-random"], overrides, folds=2)
    return run_arms(plan, "C", out, cache=cache, progress=False, reports=True, log=lambda _m: None, **kwargs)


def heldout_folds(out, cache, arm="baseline", k=2):
    """(train rows, held-out rows) of each fold, read back from the predictions the harness saved."""
    folds = []
    for f in range(k):
        held = np.load(out / f"fold{f}" / arm / "heldout.npz")["rows"]
        folds.append((np.setdiff1d(np.arange(len(cache)), held), held))
    return folds


def test_folds_are_patient_disjoint_and_pooling_covers_every_image_once(tmp_path):
    cache = FakeCache(n_patients=16, seed=2)
    fake = RecordingTrain()
    res = run_recipes(tmp_path / "b", cache, n_resamples=30, train_fn=fake)
    assert len(fake.calls) == 4  # 2 folds x 2 recipes
    folds = heldout_folds(tmp_path / "b", cache)
    heldouts = [h for _, h in folds]
    assert sorted(np.concatenate(heldouts).tolist()) == list(range(len(cache)))
    for (train_rows, heldout), i in zip(folds, range(2)):
        assert not _patients(cache, train_rows) & _patients(cache, heldout)
        for name, fit, val in fake.calls[2 * i: 2 * i + 2]:
            # the validation carve-out (thresholds, checkpoint choice) never touches the held-out fold
            assert not _patients(cache, val) & _patients(cache, heldout)
            assert not _patients(cache, fit) & _patients(cache, val)
            assert set(fit) | set(val) == set(train_rows)
    # both recipes saw the same images; pooled scores use each fold's own thresholds
    assert [c[0] for c in fake.calls] == ["baseline", "probe-random"] * 2
    s = res.scores["baseline"]
    assert s.n_images == len(cache)
    per_image_thr = s.thresholds[:, s.labels.index("Effusion")]
    f0 = np.load(tmp_path / "b" / "fold0" / "baseline" / "heldout.npz")
    k = list(f0["labels"]).index("Effusion")
    assert np.allclose(per_image_thr[f0["rows"]], f0["thresholds"][k])
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| probe-random |" in md and "Δ mean F1 vs baseline" in md
    assert (tmp_path / "b" / "report-probe-random" / "pr.png").is_file()
    out = json.loads((tmp_path / "b" / "results.json").read_text())
    vs = out["vs_reference"]["probe-random"]
    assert vs["a"] == "baseline" and "diff_f1" in vs["mean"]

    # resume: a second run trains nothing and reproduces the numbers
    again = run_recipes(tmp_path / "b", cache, n_resamples=30, train_fn=fake)
    assert len(fake.calls) == 4
    assert again.comparisons["probe-random"].diff_f1["mean"] == res.comparisons["probe-random"].diff_f1["mean"]
    # ... but not with another config in the same folder: refused, naming the arm and the key
    with pytest.raises(ValueError, match=r"arm 'baseline' changed since it was run .*schedule\.epochs: 1 -> 2"):
        run_recipes(tmp_path / "b", cache, overrides=TINY + ["schedule.epochs=2"], n_resamples=30, train_fn=fake)
    # without the plan's records (an OUT from before identity.yaml), each fold's saved hash refuses it
    (tmp_path / "b" / "plan.yaml").unlink()
    (tmp_path / "b" / "identity.yaml").unlink()
    # the run's config names the backbone file it started from (training.engine.train): not a change of the arm's
    for saved in (tmp_path / "b").glob("fold*/baseline/run/config.yaml"):
        saved.write_text(saved.read_text().replace("init: ''", "init: /elsewhere/backbone.safetensors"))
    with pytest.raises(ValueError, match=r"different config \(schedule\.epochs: 1 -> 2\)"):
        run_recipes(tmp_path / "b", cache, overrides=TINY + ["schedule.epochs=2"], n_resamples=30, train_fn=fake)
    assert len(fake.calls) == 4


def test_pool_keeps_each_images_probabilities_and_threshold_with_its_row():
    """Folds hold interleaved, unsorted rows and list their labels in different orders: after pooling, row r
    carries exactly the probability and threshold its own fold gave it, for each label by name."""
    rng = np.random.default_rng(0)
    rows0, rows1 = np.array([7, 2, 9, 4, 0]), np.array([5, 1, 8, 3, 6])
    f0 = FoldPredictions(rows0, rng.random((5, 2)), np.array([0.2, 0.7]), ["Effusion", "Mass/Nodule"], 0.0)
    f1 = FoldPredictions(rows1, rng.random((5, 2)), np.array([0.4, 0.1]), ["Mass/Nodule", "Effusion"], 0.0)
    rows, probs, thr = pool([f0, f1], ["Mass/Nodule", "Effusion"])
    assert rows.tolist() == list(range(10))
    for f in (f0, f1):
        for i, r in enumerate(f.rows):
            for k, name in enumerate(["Mass/Nodule", "Effusion"]):
                j = f.labels.index(name)
                assert probs[r, k] == f.probs[i, j]
                assert thr[r, k] == f.thresholds[j]


def test_pool_rejects_overlapping_folds():
    f = FoldPredictions(np.array([0, 1]), np.zeros((2, 1)), np.array([0.5]), ["Effusion"], 0.0)
    with pytest.raises(ValueError, match="partition"):
        pool([f, f], ["Effusion"])


def test_recipes_must_share_epochs_and_size():
    with pytest.raises(ValueError, match="schedule.epochs"):
        recipes_plan(["baseline", _yaml_with_epochs(3)], TINY[:2])


def _yaml_with_epochs(epochs):
    import tempfile
    from pathlib import Path

    from cxrvit.training.config import recipe_path

    text = recipe_path("baseline").read_text().replace("epochs: 30", f"epochs: {epochs}")
    path = Path(tempfile.mkdtemp()) / "other.yaml"
    path.write_text(text)
    return str(path)


def test_protocol_choice():
    cache = FakeCache()
    assert choose_protocol(cache, "auto") == "cv"  # small cache
    assert choose_protocol(cache, "official") == "official"
    cache.index["official_split"] = ""
    with pytest.raises(ValueError, match="split lists"):
        choose_protocol(cache, "official")


@pytest.mark.slow
@pytest.mark.precision   # trains at `auto`: bf16 where the CPU has it
def test_real_training_two_folds(tmp_path, nih_tiny_cache):
    """The real engine end to end: 2 folds x 2 recipes, vit_tiny, 32 px, 1 epoch, on real NIH images."""
    res = run_recipes(tmp_path / "b", nih_tiny_cache, n_resamples=50)
    assert res.scores["baseline"].n_images == len(nih_tiny_cache) == res.scores["probe-random"].n_images
    folds = heldout_folds(tmp_path / "b", nih_tiny_cache)
    for r in ("baseline", "probe-random"):
        for f in range(2):
            meta = json.loads((tmp_path / "b" / f"fold{f}" / r / "run" / "bundle.json").read_text())
            tuned_on = set(meta["threshold_source"]["images"])
            held = set(nih_tiny_cache.index["image"].to_numpy()[folds[f][1]])
            assert tuned_on and not tuned_on & held
    assert np.isfinite(res.comparisons["probe-random"].diff_f1["mean"].value)


def test_bench_recipes_runs_improved_end_to_end_and_no_plan_reads_a_shipped_backbone_unasked(tmp_path):
    """`improved` starts from a backbone pre-trained on the sample's train_val images. In patient folds of those
    images it would have seen the held-out half, so `bench recipes` pre-trains it inside each fold (the stage
    that made the file), and an arms plan that leaves an arm's start to such a recipe is refused before any work."""
    from cxrvit.experiments.plan import Arm, ArmsPlan

    plan = recipes_plan(["baseline", "improved"], folds=2)
    assert [(a.name, a.pretrain) for a in plan.arms] == [("baseline", None), ("improved", "mae224")]
    assert (plan.pretrain["mae224"].method, plan.pretrain["mae224"].recipe) == ("mae", "mae224")
    backbone = tmp_path / "mine.safetensors"
    backbone.write_bytes(b"")
    given = recipes_plan(["baseline", "improved"], folds=2, init=str(backbone))   # --init: the user's file instead
    assert not given.pretrain and all(a.init == str(backbone) and not a.pretrain for a in given.arms)

    cache, fake = FakeCache(n_patients=8), RecordingTrain()
    unasked = ArmsPlan(arms=[Arm("baseline", "baseline"), Arm("improved", "improved")], folds=2)
    with pytest.raises(ValueError, match=r"arm 'improved': recipe improved starts from model.init=sample/backbones/"):
        run_arms(unasked, "C", tmp_path / "u", cache=cache, train_fn=fake, progress=False, log=lambda _m: None)
    assert not fake.calls and not (tmp_path / "u").exists()
    # said knowingly (here: the random start), it runs
    knowingly = ArmsPlan(arms=[Arm("baseline", "baseline"), Arm("improved", "improved", ["model.init="])], folds=2)
    run_arms(knowingly, "C", tmp_path / "k", cache=cache, train_fn=fake, progress=False, log=lambda _m: None,
             n_resamples=10)
    assert len(fake.calls) == 4


def test_each_fold_records_the_commit_of_the_code_that_ran_it(tmp_path, monkeypatch):
    """A benchmark outlives commits made beside it; each fold recorded HEAD at its end, so a process started at
    one commit wrote later commits (and "+dirty") into folds whose code it had loaded before them."""
    from types import SimpleNamespace

    import cxrvit.experiments.crossval as crossval

    head = {"sha": "aaa1111"}
    monkeypatch.setattr(crossval.subprocess, "run", lambda args, **kw: SimpleNamespace(
        stdout=head["sha"] if "rev-parse" in args else ""))
    forget = getattr(crossval.git_commit, "cache_clear", lambda: None)

    class CommitsBeside(RecordingTrain):
        def __call__(self, *args, **kwargs):
            head["sha"] = "bbb2222"    # someone commits while the fold trains
            return super().__call__(*args, **kwargs)

    forget()
    try:
        run_recipes(tmp_path / "b", FakeCache(n_patients=16, seed=2), n_resamples=30, train_fn=CommitsBeside())
    finally:
        forget()                       # the rest of the session reads the real commit again
    provenance = {str(np.load(p)["provenance"]) for p in (tmp_path / "b").glob("fold*/*/heldout.npz")}
    assert len(provenance) == 1 and provenance.pop().startswith("commit aaa1111 on ")
