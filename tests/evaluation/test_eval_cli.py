"""The command line on a real (tiny) cache: cxrvit eval / compare, JSON and report outputs."""
import json

import numpy as np

import cxrvit.evaluation.compare as compare_module
from cxrvit.cli import main
from cxrvit.evaluation.compare import paired_compare
from evalfakes import LABELS, FakeCache, make_bundle


def _bundles(tmp_path, cache):
    train_val = np.flatnonzero(cache.index["official_split"].to_numpy() == "train_val")
    a = make_bundle(tmp_path / "a", cache, train_val[:8], seed=0)
    b = make_bundle(tmp_path / "b", cache, train_val[8:16], seed=1)
    return a, b


def test_eval_cli_json_and_report(tmp_path, nih_tiny_cache, capsys):
    cache = nih_tiny_cache
    a, _ = _bundles(tmp_path, cache)
    n_test = int((cache.index["official_split"] == "test").sum())
    assert n_test > 0, "fixture should include official test images"
    rc = main(["eval", "--model", str(a), "--data", str(cache.root), "--split", "test", "--bootstrap", "50",
               "--json", str(tmp_path / "m.json"), "--report", str(tmp_path / "rep")])
    assert rc == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert set(LABELS) <= set(out["targets"]) and out["n_images"] == n_test
    for name in ("Atelectasis", "Effusion", "Mass/Nodule"):
        t = out["targets"][name]
        assert {"f1", "threshold", "auroc", "ap", "trivial_f1", "n", "positives"} <= set(t)
    assert out["threshold_source"]["in_sample"] is False
    for f in ("report.md", "roc.png", "pr.png", "reliability.png", "f1_vs_trivial.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Mean F1 of the scored targets" in text and "no scored image shares a patient" in text
    assert "| **Effusion** |" in capsys.readouterr().out


def test_eval_cli_refuses_leak_and_marks_val_in_sample(tmp_path, nih_tiny_cache, capsys):
    cache = nih_tiny_cache
    test_rows = np.flatnonzero(cache.index["official_split"].to_numpy() == "test")
    leaky = make_bundle(tmp_path / "leaky", cache, test_rows[:3])
    assert main(["eval", "--model", str(leaky), "--data", str(cache.root), "--split", "test"]) == 2
    assert "optimistic" in capsys.readouterr().err
    assert main(["eval", "--model", str(leaky), "--data", str(cache.root), "--split", "val", "--bootstrap", "20",
                 "--report", str(tmp_path / "r")]) == 0
    assert "In-sample thresholds: F1 is optimistic" in (tmp_path / "r" / "report.md").read_text()


def test_compare_cli(tmp_path, nih_tiny_cache, capsys):
    cache = nih_tiny_cache
    a, b = _bundles(tmp_path, cache)
    rc = main(["compare", str(a), str(b), "--data", str(cache.root), "--split", "test", "--bootstrap", "50",
               "--json", str(tmp_path / "c.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "b − a mean F1 = " in out
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["difference"] == "b - a" and set(c["targets"]) == {"Atelectasis", "Effusion", "Mass/Nodule"}


def test_compare_json_into_a_new_folder_is_strict(tmp_path, monkeypatch, capsys):
    """--json DIR/new/c.json used to crash with FileNotFoundError after the whole bootstrap."""
    cache = FakeCache(n_patients=20)
    y = cache.labels(LABELS).astype(float)
    y[:, LABELS.index("Mass/Nodule")] = 0               # an undefined AUROC: null in the file, not NaN
    rng = np.random.default_rng(0)
    c = paired_compare(y, rng.random(y.shape), 0.5, rng.random(y.shape), 0.5, cache.patient_ids, LABELS,
                       names=("a", "b"), n_resamples=10)
    monkeypatch.setattr(compare_module, "compare_runs", lambda *a, **kw: c)
    out = tmp_path / "new" / "deeper" / "c.json"
    assert main(["compare", "A", "B", "--data", "C", "--split", "all", "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["targets"]["Mass/Nodule"]["auroc_a"] is None
