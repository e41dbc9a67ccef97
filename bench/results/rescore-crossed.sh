#!/usr/bin/env bash
# Re-score the multi-seed tables behind issue 20's headline claims with the crossed bootstrap (patients x seeds,
# cxrvit.evaluation.bootstrap; the default of `cxrvit bench arms` since 6 December), into results-crossed* tables
# beside the patient-only ones they were first published with. Nothing trains: every arm is finished in its OUT.
#
#   bash bench/results/rescore-crossed.sh CACHE RUNS
#   e.g. bash bench/results/rescore-crossed.sh /work/runs/sample-cache160 /work/runs
#
# RUNS holds the scoring OUTs cv2-seeds/, cv2-scaling-seeds/ and cv2-tokavg-seeds/ (each made by its folder's
# score.sh or plan, README there); the tables are copied into bench/results/<OUT>/.
set -euo pipefail
CACHE=${1:?the 160-px cache of the sample}
RUNS=${2:?folder holding the scoring OUTs}
score() { .venv/bin/python -m cxrvit bench arms "$@" --data "$CACHE" --tables results-crossed --quiet > /dev/null; }
for ref in baseline probe-random-avg probe-random; do
  score bench/results/cv2-learned/plan-mae224s-score.yaml --out "$RUNS/cv2-seeds" --reference "$ref"
done
score bench/results/cv2-scaling-seeds/plan-score.yaml --out "$RUNS/cv2-scaling-seeds"
for ref in mae224s-probe-avg probe-random-avg; do
  score bench/arms/sample-cv2-tokavg-seeds.yaml --out "$RUNS/cv2-tokavg-seeds" --reference "$ref"
done
for out in cv2-seeds cv2-scaling-seeds cv2-tokavg-seeds; do
  cp "$RUNS/$out"/results-crossed*.md "$RUNS/$out"/results-crossed*.json "bench/results/$out/"
done
