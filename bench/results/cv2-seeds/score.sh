#!/usr/bin/env bash
# Score the pre-training seeds (issue 20) in a scoring OUT made of hard links, so that the training OUT's own
# results.md (written by each partial plan) is left alone. Seed 0 of mae224s-probe* is a copy of mae224-probe*:
# the scoring plan says why. Run from the repository root:
#
#   bash bench/results/cv2-seeds/score.sh TRAIN_OUT SCORE_OUT CACHE [PLAN]
#   e.g. bash bench/results/cv2-seeds/score.sh runs/cv2-learned runs/cv2-seeds runs/sample-cache160
#
# TRAIN_OUT holds fold*/ of ../cv2-learned (copied back, or where the arms ran) plus the mae224s stages and arms.
set -euo pipefail
TRAIN=${1:?training OUT}
SCORE=${2:?scoring OUT (emptied first)}
CACHE=${3:?the 160-px cache of the sample}
PLAN=${4:-bench/results/cv2-learned/plan-mae224s-score.yaml}
rm -rf "$SCORE"; mkdir -p "$SCORE"
for d in "$TRAIN"/fold*/; do
  f=$(basename "$d"); mkdir -p "$SCORE/$f"
  for a in "$d"*/; do
    n=$(basename "$a")
    case "$n" in baseline*|probe-random*|mae224s-*|pretrain-mae224s*) cp -al "$a" "$SCORE/$f/$n";; esac
  done
  for a in mae224-probe mae224-probe-avg; do cp -r "$d$a" "$SCORE/$f/${a/mae224/mae224s}"; done
done
for ref in baseline probe-random probe-random-avg; do
  .venv/bin/python -m cxrvit bench arms "$PLAN" --data "$CACHE" --out "$SCORE" --reference "$ref"
done
