"""Every arm of issue 20 in one Markdown table, read from the scored tables its plans wrote (results*.json).

Each plan's table pairs its arms on the same patients against that table's reference; the rows here keep that
pairing (the reference is named in its column) and add where the row comes from, the seeds and folds it pools, the
training images per fold, the cost and the commit that trained it. An arm listed by several tables is taken from
the first in TABLES (the most complete: more seeds, a random-probe reference).

    python bench/results/issue20_table.py            # prints the table that docs/results.md shows

Links are written relative to docs/ (``--links DIR`` for another place).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: (table, what it is, suffix for its arms' names), in order of preference: an arm is read from the first table
#: that has it. The native-224 plan scores the same arm names on another cache, hence its suffix.
TABLES = [
    ("cv2-learned/results-vs-probe-random.json", "learned plan, 3 seeds, one MAE per fold", ""),
    ("cv2-seeds/results-vs-probe-random.json", "pre-training seeds: one MAE per fold and seed", ""),
    ("cv2-tokavg-seeds/results.json",
     "read-out: the CLS token and the patch mean at 3 pre-training seeds (AMD EPYC)", ""),
    ("cv2-budget/results.json", "budget: 480 vs 240 MAE epochs", ""),
    ("cv2-lpft/results.json", "LP-FT on the 224-px MAE, both folds", ""),
    ("cv2-lpft/results-ft-seed0.json", "full fine-tune (Medical-MAE recipe) of the 224-px MAE at 224 px", ""),
    ("cv2-extra/results-extra.json", "extra data: + 243 Hannover CXRs in pre-training (not the product)", ""),
    ("cv2-readout/results.json", "read-out: the last 4 blocks", ""),
    ("cv2-native224/results.json", "the probes on a native 224-px cache", " (native 224)"),
    ("cv2-pool/results.json", "pooling: mean and max of the patch tokens (AMD EPYC)", " (pool plan)"),
    ("cv2-pool/results-tokavg.json", "read-out: the CLS token and the patch mean side by side (AMD EPYC)",
     " (pool plan)"),
    ("cv2-resolution/results.json", "resolution: read at 448 vs 224 px from a 512-px cache", ""),
    ("cv2-tokavg-seeds/results-ijepa-vs-probe-random-avg.json",
     "I-JEPA at the MAE's compute (100 epochs), seed 0: a failure, no more seeds by its rule (AMD EPYC)", ""),
    ("cv2-ijepa-ctx-fold0/results.json", "diagnostic: I-JEPA's context encoder instead of its EMA target, fold 0",
     " (fold 0)"),
    ("cv2-ijepa-ctx-fold1/results.json", "diagnostic: I-JEPA's context encoder instead of its EMA target, fold 1",
     " (fold 1)"),
    ("cv2-scaling-seeds/results.json", "data scaling of the product at 3 pre-training seeds: 1/4, 1/2, all", ""),
    ("cv2-tokavg-seeds/results-labels-vs-probe-random-avg.json",
     "label scaling: the full-share MAEs read with 1/4 and 1/2 of the labels (AMD EPYC)", ""),
    ("cv2-scaling/results.json", "data scaling: 1/4, 1/2, all; Δ vs the full-share baseline", ""),
]


def _ci(est: dict) -> str:
    return f"{est['value']:.3f} ({est['lo']:.3f} to {est['hi']:.3f})"


def _delta(est: dict) -> str:
    return f"{est['value']:+.3f} ({est['lo']:+.3f} to {est['hi']:+.3f})"


def _trained(info: dict, arm: str) -> str:
    origins = [o for o in info.get("trained_by", {}).get(arm, []) if o]
    commits = sorted({o.split()[1] for o in origins if o.startswith("commit ")})
    return ", ".join(commits) or "not recorded"


def rows(tables=TABLES, links: str = "../bench/results/") -> list[str]:
    seen, out = set(), []
    for rel, what, suffix in tables:
        path = HERE / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: scored table missing (run the plan's scoring first)")
        table = json.loads(path.read_text())
        info, ref = table["info"], table["reference"]
        seeds, folds = ",".join(map(str, info["seeds"])), ",".join(map(str, info["scored_folds"]))
        for arm in table["arms"]:
            if arm + suffix in seen:
                continue
            seen.add(arm + suffix)
            head = table["scores"][arm]["headline"]
            vs = table["vs_reference"].get(arm, {}).get("mean")
            cost = table["cost_minutes"][arm]
            images = info.get("train_images", {}).get(arm)
            out.append(" | ".join([
                f"| {arm}{suffix}", f"[{Path(rel).parent}]({links}{Path(rel).with_suffix('.md')}): {what}", seeds, folds,
                f"{images:.0f}" if images else "—",
                _ci(head["mean_f1_scored"]), _ci(head["mean_auroc_scored"]),
                _delta(vs["diff_f1"]) if vs else "—", _delta(vs["diff_auroc"]) if vs else "—", ref,
                f"{cost['pretrain']:.0f} + {cost['train']:.0f}", _trained(info, arm)]) + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", default="../bench/results/", help="prefix of the links to the tables")
    args = ap.parse_args()
    print("| arm | scored table | seeds | folds | train images per fold | mean F1 [95% CI] | mean AUROC [95% CI] "
          "| Δ F1 vs reference [paired 95% CI] | Δ AUROC vs reference [paired 95% CI] | reference | cost min "
          "(pretrain + train) | trained at commit |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    print("\n".join(rows(links=args.links)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
