"""`cxrvit bench arms|recipes`: a thin CLI over the one arms harness; bad input exits 2 with the reason."""
from pathlib import Path

import pytest
import yaml

import cxrvit.experiments.arms as arms_module
from cxrvit.cli import main

TINY = ["model.arch=vit_tiny", "model.img_size=32", "schedule.epochs=1", "schedule.batch_size=16",
        "engine.checkpoint_every=0"]


def test_bench_lists_both_commands(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "arms" in out and "recipes" in out


def test_bench_arms_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"arms": [{"name": "baseline", "recipe": "baseline"}]}))
    assert main(["bench", "arms", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "at least two arms" in err


def test_bench_recipes_refuses_an_unfair_pair(tmp_path, capsys):
    from cxrvit.training.config import recipe_path

    other = tmp_path / "short.yaml"
    other.write_text(recipe_path("baseline").read_text().replace("epochs: 30", "epochs: 3"))
    assert main(["bench", "recipes", "--data", str(tmp_path), "--recipes", "baseline", str(other)]) == 2
    assert "schedule.epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_recipes_runs_the_two_arm_plan_with_the_old_layout(tmp_path, nih_tiny_cache, capsys):
    out = tmp_path / "b"
    # (the default B, improved, pre-trains its MAE in every fold: tests/experiments/test_crossval.py)
    argv = ["bench", "recipes", "--data", str(nih_tiny_cache.root), "--folds", "2", "--out", str(out), "--quiet",
            "--bootstrap", "20", "--recipes", "baseline", "probe-random", *sum((["--set", s] for s in TINY), [])]
    assert main(argv) == 0
    assert "| probe-random |" in capsys.readouterr().out
    for f in range(2):
        for arm in ("baseline", "probe-random"):
            assert (out / f"fold{f}" / arm / "heldout.npz").is_file()
    assert (out / "report-baseline" / "roc.png").is_file() and (out / "results.json").is_file()
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["reference"] == "baseline" and [a["name"] for a in plan["arms"]] == ["baseline", "probe-random"]
    # the same command again trains nothing: every fold's model and predictions are reused as they are
    stamps = {p: p.stat().st_mtime_ns for p in Path(out).glob("fold*/*/*") if p.is_file() or p.name == "run"}
    stamps |= {p: p.stat().st_mtime_ns for p in Path(out).glob("fold*/*/run/*.safetensors")}
    assert main(argv) == 0
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.parametrize("flag, value, message", [
    ("--reference", "probe-randm", "reference 'probe-randm' is not an arm of the plan (baseline, probe)"),
    ("--tables", "../results", "tables '../results': give a plain file stem"),
])
def test_bench_arms_refuses_a_bad_reference_or_tables_stem_before_any_work(tmp_path, capsys, flag, value, message):
    plan = tmp_path / "arms.yaml"
    plan.write_text(yaml.safe_dump({"folds": 2, "arms": [{"name": "baseline", "recipe": "baseline"},
                                                         {"name": "probe", "recipe": "probe-random"}]}))
    out = tmp_path / "o"
    assert main(["bench", "arms", str(plan), "--data", str(tmp_path / "no-cache"), "--out", str(out),
                 flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()                                     # refused before a folder or a cache is touched


def test_append_to_a_file_in_a_new_folder(tmp_path, monkeypatch, capsys):
    """--append-to DIR/new/x.md used to crash with FileNotFoundError once the benchmark had finished."""
    plan = tmp_path / "arms.yaml"
    plan.write_text(yaml.safe_dump({"folds": 2, "arms": [{"name": "baseline", "recipe": "baseline"},
                                                         {"name": "probe", "recipe": "probe-random"}]}))

    class Finished:
        def markdown(self):
            return "| the table |\n"

    monkeypatch.setattr(arms_module, "run_arms", lambda *a, **kw: Finished())
    target = tmp_path / "new" / "notes.md"
    assert main(["bench", "arms", str(plan), "--data", "C", "--out", str(tmp_path / "o"),
                 "--append-to", str(target)]) == 0
    assert target.read_text() == "\n| the table |\n"
