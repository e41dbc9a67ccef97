"""bench/results/collect.sh: what a benchmark OUT leaves in the repository (no weights), whole or one plan's part."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "results" / "collect.sh"


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    for arm in ("probe", "mae-x", "mae-y"):
        run = out / "fold0" / arm / "run"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(arm)
        (run / "model.safetensors").write_bytes(b"weights")
        (run.parent / "heldout.npz").write_bytes(arm.encode())
    stage = out / "fold0" / "pretrain-x"
    stage.mkdir()
    for name in ("cost.json", "config.yaml", "last.pt"):
        (stage / name).write_text(name)
    for name in ("results", "results-vs-probe", "results-x", "results-x-vs-mae-x"):
        (out / f"{name}.md").write_text(name)
        (out / f"{name}.json").write_text("{}")
    return out


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _collect(*args) -> str:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=True).stdout


def test_the_whole_out_without_weights(tmp_path):
    out, dest = _out(tmp_path), tmp_path / "dest"
    assert "collected 3 arm-folds and 1 pre-trainings" in _collect(out, dest)
    got = _files(dest)
    assert {"fold0/probe/heldout.npz", "fold0/mae-y/run/config.yaml", "fold0/pretrain-x/cost.json",
            "results.md", "results-vs-probe.json"} <= got
    assert not any(name.endswith((".safetensors", "last.pt")) for name in got)
    assert "results-x.md" in got                           # without a stem: every results*.md|json, as ever


def test_one_plans_part_of_a_shared_out(tmp_path):
    out, dest = _out(tmp_path), tmp_path / "dest"
    _collect(out, tmp_path / "only-results", "results")
    assert {"results.md", "results.json", "results-vs-probe.md", "results-vs-probe.json"} <= _files(tmp_path / "only-results")
    assert "results-x.md" not in _files(tmp_path / "only-results")     # another plan's tables stay in OUT
    assert "collected 1 arm-folds and 1 pre-trainings" in _collect(out, dest, "results-x", "mae-x*", "pretrain-x*")
    assert _files(dest) == {"fold0/mae-x/heldout.npz", "fold0/mae-x/run/config.yaml", "fold0/pretrain-x/cost.json",
                            "fold0/pretrain-x/config.yaml", "results-x.md", "results-x.json",
                            "results-x-vs-mae-x.md", "results-x-vs-mae-x.json"}
