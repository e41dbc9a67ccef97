"""bench/results/issue20_table.py: every arm of the committed issue-20 tables, once, with its own table's numbers."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "results" / "issue20_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("issue20_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_arm_of_every_table_appears_once_with_the_numbers_of_the_first_table_that_has_it():
    mod = _module()
    expected, first = [], {}
    for rel, _what, suffix in mod.TABLES:
        table = json.loads((ROOT / "bench" / "results" / rel).read_text())
        for arm in table["arms"]:
            if arm + suffix not in first:
                first[arm + suffix] = table["scores"][arm]["headline"]["mean_auroc_scored"]["value"]
                expected.append(arm + suffix)
    lines = mod.rows()
    names = [line.split(" | ")[0].removeprefix("| ") for line in lines]
    assert names == expected and len(set(names)) == len(names)
    for name, line in zip(names, lines):
        assert f"{first[name]:.3f} (" in line.split(" | ")[6]          # mean AUROC [CI] from that table
        assert line.count(" | ") == 11                                 # 12 cells, as the header has
    # the links resolve from docs/, where the table is shown
    for line in lines:
        link = line.split("](")[1].split(")")[0]
        assert (ROOT / "docs" / link).resolve().is_file(), link


def test_the_script_prints_a_header_and_a_row_per_arm():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("| arm | scored table |") and lines[1].startswith("| --- |")
    assert len(lines) == 2 + len(_module().rows())
