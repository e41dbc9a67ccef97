#!/usr/bin/env bash
# The main job on the embedded real sample, end to end: prepare -> (pre-train) -> train (improved) -> evaluate on
# NIH's official test images -> predict with heat-maps.
#
#   bash scripts/run_sample.sh [--pretrain] [DATA_DIR] [OUT_DIR] [extra `cxrvit train --set` overrides...]
#
# DATA_DIR defaults to sample/nih-sample (shipped with the repository); OUT_DIR to runs/sample.
# `improved` reads out a ViT-S/16 that MAE pre-trained on the sample's train_val images. By default that is the
# backbone the repository ships (sample/backbones/, made by the same pre-training: sample/README.md), and the
# job takes a few minutes on 2 CPU cores. --pretrain runs the pre-training here instead (`cxrvit pretrain
# --recipe mae224` on OUT_DIR/cache: ~3.5 h on 2 cores with native bf16, longer without), resumes it when
# killed, reuses it when finished, and reads out that backbone (README: cost); its run and results go to
# OUT_DIR/own-backbone/, so they never overwrite the default job's (OUT_DIR/run, test_metrics.json, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN=0
if [ "${1:-}" = "--pretrain" ]; then PRETRAIN=1; shift; fi
DATA=${1:-sample/nih-sample}
OUT=${2:-runs/sample}
shift $(( $# > 2 ? 2 : $# ))
CXRVIT=${CXRVIT:-.venv/bin/cxrvit}
INIT=()
RES="$OUT"                             # where this job's run, metrics, report and predictions go

echo "== 1/5 prepare: decode $DATA once into a 160-px cache"
"$CXRVIT" prepare --data "$DATA" --out "$OUT/cache" --size 160
"$CXRVIT" data-summary "$OUT/cache"

if [ "$PRETRAIN" = 1 ]; then
  SSL="$OUT/pretrain-mae224"
  RES="$OUT/own-backbone"              # never mixed up with the job on the shipped backbone
  INIT=(--init "$SSL/backbone.safetensors")
  if [ -f "$SSL/pretrain.json" ] && [ -f "$SSL/backbone.safetensors" ]; then
    echo "== 2/5 pre-train: $SSL is finished (delete it to pre-train again)"
  else
    RESUME=(); [ -f "$SSL/last.pt" ] && RESUME=(--resume)
    echo "== 2/5 pre-train: MAE (recipe mae224) on the train_val images of $OUT/cache -> $SSL ${RESUME[*]:-}"
    "$CXRVIT" pretrain --method mae --recipe mae224 --data "$OUT/cache" --out "$SSL" "${RESUME[@]}"
  fi
else
  echo "== 2/5 pre-train: using the shipped backbone (improved's model.init; --pretrain makes your own)"
fi
RUN="$RES/run"

if [ "$PRETRAIN" = 0 ] && [ -f "$RUN/config.yaml" ] && ! grep -q "init: sample/backbones/" "$RUN/config.yaml"; then
  echo "error: $RUN was trained without the shipped learned backbone (an earlier improved recipe?); delete it," \
       "or give another OUT_DIR" >&2
  exit 2
fi
if [ -f "$RUN/config.yaml" ] && [ $# -gt 0 ]; then
  echo "warning: $RUN exists, so the overrides '$*' are not applied (its saved config is); delete it to use them" >&2
fi
if [ -f "$RUN/bundle.json" ]; then
  echo "== 3/5 train: $RUN is finished (delete it to train again)"
elif [ -f "$RUN/config.yaml" ]; then
  echo "== 3/5 train: resuming the interrupted run in $RUN with its saved config"
  "$CXRVIT" train --resume "$RUN"
else
  echo "== 3/5 train: the improved recipe (frozen MAE ViT-S/16 + cross-fitted linear head, 224 px) on NIH's train_val images"
  "$CXRVIT" train --recipe improved --data "$OUT/cache" --out "$RUN" "${INIT[@]}" "$@"
fi

# Steps 4-5 are redone only when the model is newer than their outputs (a finished job re-runs in seconds).
if [ "$RES/test_metrics.json" -nt "$RUN/bundle.json" ] && [ -f "$RES/report/report.md" ]; then
  echo "== 4/5 evaluate: $RES/test_metrics.json is up to date with $RUN"
else
  echo "== 4/5 evaluate on NIH's official test images (never used for pre-training, training or thresholds)"
  "$CXRVIT" eval --model "$RUN" --data "$OUT/cache" --split test --json "$RES/test_metrics.json" --report "$RES/report"
fi

if [ "$RES/predict.done" -nt "$RUN/bundle.json" ]; then   # written only once both predictions are complete
  echo "== 5/5 predict: $RES/predictions.csv and heatmaps/ are up to date with $RUN"
else
  echo "== 5/5 predict: official test images, with explanation heat-maps for the first 8"
  IMAGES=$(cd "$DATA/images" && pwd)   # absolute: paths in a list file are read relative to the list
  awk -v d="$IMAGES" '{print d "/" $1}' "$DATA/test_list.txt" > "$RES/test_images.txt"
  head -n 8 "$RES/test_images.txt" > "$RES/heatmap_images.txt"
  "$CXRVIT" predict --model "$RUN" "$RES/test_images.txt" --out "$RES/predictions.csv"
  "$CXRVIT" predict --model "$RUN" "$RES/heatmap_images.txt" --out "$RES/heatmap_predictions.csv" --heatmaps "$RES/heatmaps"
  date -u > "$RES/predict.done"
fi

echo "done: $RES/test_metrics.json, $RES/report/report.md, $RES/predictions.csv, $RES/heatmaps/"
