"""`cxrvit prepare` and `cxrvit data-summary` through the command line, plus the real-sample numbers."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from cxrvit.cli import main
from cxrvit.data.cache import CXRCache
from cxrvit.data.summary import SUMMARY_LABELS, format_summary, summarize


def test_prepare_and_summary_cli(nih_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "c"
    assert main(["prepare", "--data", str(nih_dir), "--out", str(out), "--size", "16", "--workers", "1",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "cache ready" in captured.out and "3 listed images are absent" in captured.err
    assert "views: all kept (AP 4, PA 8)" in captured.err
    assert main(["data-summary", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["patients"]) == (12, 8)
    assert list(summary["positives"])[:3] == ["Atelectasis", "Effusion", "Mass/Nodule"]
    assert summary["positives"]["Mass/Nodule"] == 3 and summary["positives"]["Effusion"] == 5
    assert summary["views"] == {"AP": 4, "PA": 8}
    assert summary["splits"]["test"]["images"] == 5 and summary["splits"]["train_val"]["patients"] == 4
    assert main(["data-summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("Atelectasis") < text.index("Effusion") < text.index("Mass/Nodule") < text.index("Cardiomegaly")


def test_cli_errors_are_clear(nih_copy: Path, tmp_path: Path, capsys):
    (nih_copy / "images" / "00000404_000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["prepare", "--data", str(nih_copy), "--out", str(tmp_path / "c"), "--size", "16", "--workers", "1",
            "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "00000404_000.png" in err and "--skip-bad" in err
    assert main(["data-summary", str(tmp_path / "c")]) == 1
    assert "COMPLETE is missing" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    assert main(["prepare", "--data", str(nih_copy), "--out", str(tmp_path / "s"), "--strict", "--no-progress"]) == 1
    assert "--strict" in capsys.readouterr().err


def test_real_sample_numbers(real_cache: CXRCache):
    """The acceptance numbers of the issue, on the 1,099 real NIH images."""
    assert len(real_cache) == 1099
    if Path(real_cache.meta["source"]).parts[-3:] == ("shared", "data", "nih-sample"):  # NIH's full CSV
        assert real_cache.meta["listed_absent"] == 111_021
        assert any("111,021 listed images are absent" in line for line in real_cache.report_lines)
    modes = [Image.open(Path(real_cache.meta["source"]) / p).mode for p in real_cache.index["path"]]
    assert (modes.count("L"), modes.count("RGBA")) == (1092, 7)
    summary = summarize(real_cache)
    assert {k: summary["positives"][k] for k in ("Atelectasis", "Effusion", "Mass/Nodule")} == {
        "Atelectasis": 143, "Effusion": 128, "Mass/Nodule": 163}
    assert summary["patients"] == 944 and summary["views"] == {"AP": 384, "PA": 715}
    assert summary["splits"]["train_val"]["images"] == 956 and summary["splits"]["test"]["images"] == 143
    assert list(summary["positives"]) == list(SUMMARY_LABELS)
    assert "Mass/Nodule" in format_summary(summary)
    # RGBA rows decoded to real grey pictures, not blank or alpha
    rgba_rows = [i for i, m in enumerate(modes) if m == "RGBA"]
    assert real_cache.pixels[rgba_rows].reshape(7, -1).std(1).min() > 20
