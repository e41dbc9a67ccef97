#!/usr/bin/env bash
# Score the data-scaling test at seeds 0-2 (issue 20) in a scoring OUT of hard links and copies, so that the
# training OUT's tables are left alone. Seeds 1-2 come from the OUT where bench/arms/sample-cv2-scaling-seeds.yaml
# ran; seed 0 from the committed seed-0 scaling plan (../cv2-scaling), renamed as plan-score.yaml says why.
# Run from the repository root:
#
#   bash bench/results/cv2-scaling-seeds/score.sh TRAIN_OUT SCORE_OUT CACHE [PLAN]
#   e.g. bash bench/results/cv2-scaling-seeds/score.sh runs/cv2-learned runs/cv2-scaling-seeds runs/sample-cache160
# PLAN defaults to plan-score.yaml (1/4, 1/2, all); plan-score-q25.yaml scores 1/4 and all alone. Folders a plan
# does not need may be absent; a missing one that it needs is named by `bench arms` when it scores.
set -euo pipefail
TRAIN=${1:?training OUT (seeds 1-2)}
SCORE=${2:?scoring OUT (emptied first)}
CACHE=${3:?the 160-px cache of the sample}
PLAN=${4:-bench/results/cv2-scaling-seeds/plan-score.yaml}
SEED0=bench/results/cv2-scaling
rm -rf "$SCORE"; mkdir -p "$SCORE"
for f in fold0 fold1; do
  mkdir -p "$SCORE/$f"
  for n in probe-random-avg probe-random-avg-q50 probe-random-avg-q25 mae224s-probe-avg mae224s-probe-avg-q50 \
           mae224s-probe-avg-q25 pretrain-mae224s pretrain-mae224s-q50 pretrain-mae224s-q25; do
    for s in 1 2; do if [ -e "$TRAIN/$f/$n-seed$s" ]; then cp -al "$TRAIN/$f/$n-seed$s" "$SCORE/$f/$n-seed$s"; fi; done
  done
  for n in probe-random-avg probe-random-avg-q50 probe-random-avg-q25 mae224-probe-avg mae224-probe-avg-q50 \
           mae224-probe-avg-q25 pretrain-mae224 pretrain-mae224-q50 pretrain-mae224-q25; do
    cp -r "$SEED0/$f/$n" "$SCORE/$f/${n/mae224/mae224s}"
  done
done
.venv/bin/python -m cxrvit bench arms "$PLAN" --data "$CACHE" --out "$SCORE"
