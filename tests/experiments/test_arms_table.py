"""What an arms table says beyond its numbers: other references, stacked copies, who trained what, how runs learned."""
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

import cxrvit.experiments.arms as arms_module
from cxrvit.experiments.arms import run_arms
from cxrvit.experiments.arms_table import ArmsResult, fold_seed_cells, learning_summary
from cxrvit.experiments.crossval import FoldPredictions, git_commit, load_fold
from cxrvit.experiments.plan import arm_dir, load_plan
from cxrvit.labels import SCORED_TARGETS
from cxrvit.runtime import machine_description
from armsfakes import QUIET, RecordingTrain, write_plan
from evalfakes import FakeCache


def test_another_reference_rescores_a_finished_benchmark_into_its_own_table(tmp_path):
    cache = FakeCache(n_patients=12, seed=7)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0]))
    fake = RecordingTrain()
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    before = (tmp_path / "b" / "results.md").read_text()
    vs = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, reference="improved", **QUIET)
    assert len(fake.calls) == 2 * 3                             # nothing trained again
    assert set(vs.comparisons) == {"baseline", "low-lr"} and vs.comparisons["low-lr"].names == ("improved", "low-lr")
    # the pairing is symmetric: baseline - improved is minus improved - baseline on the same resamples' patients
    assert vs.comparisons["baseline"].diff_auroc["mean"].value == pytest.approx(
        -res.comparisons["improved"].diff_auroc["mean"].value)
    assert "Δ mean F1 vs improved" in (tmp_path / "b" / "results-vs-improved.md").read_text()
    assert json.loads((tmp_path / "b" / "results-vs-improved.json").read_text())["reference"] == "improved"
    assert (tmp_path / "b" / "results.md").read_text() == before  # the plan's own table is left alone
    with pytest.raises(ValueError, match="reference 'nope' is not an arm of the plan"):
        run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=fake, reference="nope", **QUIET)


def test_a_second_plan_on_the_same_out_keeps_its_own_tables_under_its_stem(tmp_path):
    """A continued stage lives in the OUT of the plan it continues; that plan's results.md must survive the
    second plan's scoring, which writes OUT/<tables>.md (and <tables>-vs-ARM.md) with only its own arms."""
    cache = FakeCache(n_patients=12, seed=7)
    fake = RecordingTrain()
    first = load_plan(write_plan(tmp_path / "first.yaml", seeds=[0]))
    run_arms(first, "C", tmp_path / "b", cache=cache, train_fn=fake, **QUIET)
    before = (tmp_path / "b" / "results.md").read_text()
    arms = [{"name": "baseline", "recipe": "baseline"}, {"name": "high-lr", "recipe": "baseline",
                                                          "overrides": ["optim.lr=1e-2"]}]
    second = load_plan(write_plan(tmp_path / "second.yaml", seeds=[0], arms=arms))
    res = run_arms(second, "C", tmp_path / "b", cache=cache, train_fn=fake, tables="results-second", **QUIET)
    assert len(fake.calls) == 2 * 3 + 2                         # baseline reused, high-lr trained on both folds
    assert set(res.scores) == {"baseline", "high-lr"}
    assert (tmp_path / "b" / "results.md").read_text() == before
    md = (tmp_path / "b" / "results-second.md").read_text()
    assert "| high-lr |" in md and "| low-lr |" not in md
    run_arms(second, "C", tmp_path / "b", cache=cache, train_fn=fake, tables="results-second", reference="high-lr",
             **QUIET)
    assert json.loads((tmp_path / "b" / "results-second-vs-high-lr.json").read_text())["reference"] == "high-lr"
    assert not (tmp_path / "b" / "results-vs-high-lr.json").exists()
    for bad in ("", "../elsewhere", "sub/results", ".hidden"):
        with pytest.raises(ValueError, match="plain file stem"):
            run_arms(second, "C", tmp_path / "b", cache=cache, train_fn=fake, tables=bad, **QUIET)


def test_seeds_that_changed_nothing_are_named(tmp_path):
    """The fake builds its model from the seed's parity: seeds 0 and 2 make the same predictions, as a probe on
    a fixed pre-trained backbone does; the table says those rows are one run stacked."""
    cache = FakeCache(n_patients=12, seed=7)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0, 2]))
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), **QUIET)
    assert res.identical_seeds == ["baseline", "improved", "low-lr"]
    assert "Seeds that changed nothing: baseline, improved, low-lr" in (tmp_path / "b" / "results.md").read_text()
    assert json.loads((tmp_path / "b" / "results.json").read_text())["identical_seeds"] == res.identical_seeds


def test_several_seeds_are_resampled_with_the_patients_unless_held_fixed(tmp_path):
    cache = FakeCache(n_patients=40, seed=7)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0, 1]))
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), **QUIET)
    assert {c.bootstrap["unit"] for c in res.comparisons.values()} == {"patient x seed"}
    assert res.scores["baseline"].bootstrap["unit"] == "patient x seed"
    assert "resamples patients and, crossed with them, seeds" in (tmp_path / "b" / "results.md").read_text()
    fixed = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), resample_seeds=False,
                     tables="fixed", **QUIET)
    assert {c.bootstrap["unit"] for c in fixed.comparisons.values()} == {"patient"}
    assert "seeds, if several, held fixed" in (tmp_path / "b" / "fixed.md").read_text()
    one = run_arms(load_plan(write_plan(tmp_path / "one.yaml", seeds=[0])), "C", tmp_path / "c", cache=cache,
                   train_fn=RecordingTrain(), **QUIET)
    assert {c.bootstrap["unit"] for c in one.comparisons.values()} == {"patient"}   # one seed: nothing to draw


def test_each_fold_and_seed_is_scored_alone_beside_the_pooled_table(tmp_path):
    """The pooled rows hide where a difference comes from; the per-fold-and-seed cells are each fold's held-out
    predictions scored by themselves (sklearn's AUROC and F1 at that fold's thresholds), the reference absolute."""
    cache = FakeCache(n_patients=40, seed=7)            # every fold holds both classes of each scored target
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0, 1]))
    res = run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), **QUIET)
    assert list(res.cells["baseline"]) == ["f0s0", "f0s1", "f1s0", "f1s1"]
    labels = res.scores["baseline"].labels
    for arm in plan.arms:
        for f, seed in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            fold, _ = load_fold(arm_dir(tmp_path / "b", f, arm, seed) / "heldout.npz")
            y = cache.labels(fold.labels)[fold.rows]
            scored = [fold.labels.index(t) for t in SCORED_TARGETS if t in labels]
            auroc = np.mean([roc_auc_score(y[:, k], fold.probs[:, k]) for k in scored])
            f1 = np.mean([f1_score(y[:, k], fold.probs[:, k] >= fold.thresholds[k]) for k in scored])
            assert np.isfinite(auroc) and np.isfinite(f1)
            cell = res.cells[arm.name][f"f{f}s{seed}"]
            assert (cell["mean_auroc"], cell["mean_f1"]) == (pytest.approx(auroc), pytest.approx(f1))
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| arm | fold 0 seed 0 | fold 0 seed 1 | fold 1 seed 0 | fold 1 seed 1 |" in md
    ref, other = res.cells["baseline"]["f1s1"], res.cells["low-lr"]["f1s1"]
    assert f"{ref['mean_auroc']:.3f} / {ref['mean_f1']:.3f} |" in md.split("| baseline |")[-1].split("\n")[0]
    assert md.split("| low-lr |")[-1].split("\n")[0].rstrip().endswith(
        f"{other['mean_auroc'] - ref['mean_auroc']:+.3f} / {other['mean_f1'] - ref['mean_f1']:+.3f} |")
    assert json.loads((tmp_path / "b" / "results.json").read_text())["per_fold_seed"] == res.cells
    one = run_arms(load_plan(write_plan(tmp_path / "one.yaml", seeds=[0], run_folds=[0])), "C", tmp_path / "c",
                   cache=cache, train_fn=RecordingTrain(), **QUIET)
    assert list(one.cells["baseline"]) == ["f0s0"] and "Each fold and seed alone" not in one.markdown()
    one.info["protocol"] = "official"                 # one test set, seeds 0 and 1: the cells are seeds
    one.cells = {a: {"f0s0": {"mean_auroc": 0.6, "mean_f1": 0.2}, "f0s1": {"mean_auroc": 0.7, "mean_f1": 0.3}}
                 for a in one.arms}
    one.cells["low-lr"]["f0s1"]["mean_auroc"] = float("nan")    # a test set without a positive: no AUROC
    md = one.markdown()
    assert "| arm | seed 0 | seed 1 |" in md and "Each seed alone" in md
    assert "| low-lr | +0.000 / +0.000 | n/a / +0.000 |" in md


def test_a_rescored_table_names_who_trained_each_arm_not_only_who_scored_it(tmp_path, monkeypatch):
    cache = FakeCache(n_patients=12, seed=7)
    plan = load_plan(write_plan(tmp_path / "arms.yaml", seeds=[0]))
    run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), **QUIET)
    trained = f"commit {git_commit()} on {machine_description()}"
    for path in (tmp_path / "b").glob("fold*/low-lr/heldout.npz"):    # as saved before provenance was kept
        with np.load(path) as z:
            old = {k: z[k] for k in z.files if k != "provenance"}
        np.savez(path, **old)
    monkeypatch.setattr(arms_module, "git_commit", lambda: "abc1234")   # re-scored at a later commit
    run_arms(plan, "C", tmp_path / "b", cache=cache, train_fn=RecordingTrain(), reference="low-lr", **QUIET)
    md = (tmp_path / "b" / "results-vs-low-lr.md").read_text()
    assert "- scored on: " in md and "commit `abc1234`" in md
    assert f"- trained: baseline, improved: {trained}" in md
    assert "- trained: low-lr: not recorded" in md


def test_learning_summary_reads_epochs_of_fine_tuning_and_the_c_search_of_a_probe(tmp_path):
    def run(name, records):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp_path / name

    ft = [run(f"ft{i}", [{"kind": "train", "step": 1, "loss": 1.0}] +
              [{"kind": "val", "epoch": e, "score": s} for e, s in enumerate(scores)])
          for i, scores in enumerate([[0.5, 0.7, 0.6], [0.5, 0.5, 0.6]])]
    s = learning_summary(ft)
    assert (s["epochs"], s["best_epoch"], round(s["best"], 3), round(s["last"], 3)) == (3, 2, 0.6, 0.6)
    probes = [run(f"p{i}", [{"kind": "val", "C": c, "score": v} for c, v in grid])
              for i, grid in enumerate([[(0.1, 0.55), (1.0, 0.60)], [(0.1, 0.58), (1.0, 0.52)]])]
    assert learning_summary(probes) == {"probe_oof": pytest.approx(0.59), "C": [1.0, 0.1]}


def test_a_fold_without_a_positive_is_null_in_the_table_json():
    """One fold's held-out images carry no Effusion: its per-fold mean AUROC is NaN, written as null."""
    labels = ["Atelectasis", "Effusion", "Mass/Nodule"]
    rng = np.random.default_rng(0)
    y = (rng.random((12, 3)) < 0.5).astype(float)
    y[:6, 1] = 0                                           # fold 0 (rows 0..5): no Effusion
    folds = [FoldPredictions(np.arange(6 * f, 6 * f + 6), rng.random((6, 3)), np.full(3, 0.5), labels, 1.0)
             for f in range(2)]
    cells = fold_seed_cells(y, {"a": {0: folds}}, labels, [0, 1])
    assert np.isnan(cells["a"]["f0s0"]["mean_auroc"]) and not np.isnan(cells["a"]["f1s0"]["mean_auroc"])
    res = ArmsResult(["a"], "a", {}, {}, {"a": {"train": 1.0, "pretrain": 0.0}}, {}, cells=cells)
    out = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert out["per_fold_seed"]["a"]["f0s0"]["mean_auroc"] is None
    assert out["per_fold_seed"]["a"]["f1s0"] == pytest.approx(cells["a"]["f1s0"])
