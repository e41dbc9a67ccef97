#!/usr/bin/env bash
# Score the budget test (issue 20, bench/arms/sample-cv2-budget.yaml) in a scoring OUT of hard links, so that the
# training OUT's own results.md is left alone, then collect it into this folder. Run from the repository root:
#
#   bash bench/results/cv2-budget/score.sh TRAIN_OUT SCORE_OUT CACHE [PLAN]
#   e.g. bash bench/results/cv2-budget/score.sh /work/runs/cv2-learned /work/runs/cv2-budget \
#          /work/runs/sample-cache160 bench/results/cv2-learned/plan-mae224c-seed1.yaml
#
# TRAIN_OUT holds the mae224s stages of seeds 0-2 (with last.pt) and the arms of bench/results/cv2-learned.
set -euo pipefail
TRAIN=${1:?training OUT}
SCORE=${2:?scoring OUT (emptied first)}
CACHE=${3:?the 160-px cache of the sample}
PLAN=${4:-bench/arms/sample-cv2-budget.yaml}
rm -rf "$SCORE"; mkdir -p "$SCORE"
for d in "$TRAIN"/fold*/; do
  f=$(basename "$d"); mkdir -p "$SCORE/$f"
  for a in "$d"*/; do
    n=$(basename "$a")
    case "$n" in probe-random-avg*|mae224s-probe-avg*|mae224c-*|pretrain-mae224s|pretrain-mae224s-seed*|pretrain-mae224c*)
      cp -al "$a" "$SCORE/$f/$n";; esac
  done
done
for ref in probe-random-avg mae224s-probe-avg; do
  .venv/bin/python -m cxrvit bench arms "$PLAN" --data "$CACHE" --out "$SCORE" --reference "$ref"
done
bash bench/results/collect.sh "$SCORE" bench/results/cv2-budget
# The reference arms' predictions are committed with their own plans (../cv2-learned, ../cv2-seeds): keep only ours.
for d in bench/results/cv2-budget/fold*/*/; do
  case "$(basename "$d")" in mae224c-*|pretrain-mae224c*) ;; *) rm -rf "$d";; esac
done
