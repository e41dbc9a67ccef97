#!/usr/bin/env bash
# The main job on the embedded real sample, end to end: prepare -> train (improved) -> evaluate on NIH's
# official test images -> predict with heat-maps. About 3 minutes on 2 CPU cores (README).
#
#   bash scripts/run_sample.sh [DATA_DIR] [OUT_DIR] [extra `cxrvit train --set` overrides...]
#
# DATA_DIR defaults to sample/nih-sample (shipped with the repository); OUT_DIR to runs/sample.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-sample/nih-sample}
OUT=${2:-runs/sample}
shift $(( $# > 2 ? 2 : $# ))
CXRVIT=${CXRVIT:-.venv/bin/cxrvit}

echo "== 1/4 prepare: decode $DATA once into a 160-px cache"
"$CXRVIT" prepare --data "$DATA" --out "$OUT/cache" --size 160
"$CXRVIT" data-summary "$OUT/cache"

if [ -f "$OUT/run/bundle.json" ]; then
  echo "== 2/4 train: $OUT/run is finished (delete it to train again)"
elif [ -f "$OUT/run/config.yaml" ]; then
  echo "== 2/4 train: resuming the interrupted run in $OUT/run with its saved config"
  "$CXRVIT" train --resume "$OUT/run"
else
  echo "== 2/4 train: the improved recipe (frozen ViT-S/16 + cross-fitted linear head, 224 px) on NIH's train_val images"
  "$CXRVIT" train --recipe improved --data "$OUT/cache" --out "$OUT/run" "$@"
fi

echo "== 3/4 evaluate on NIH's official test images (never used for training or thresholds)"
"$CXRVIT" eval --model "$OUT/run" --data "$OUT/cache" --split test --json "$OUT/test_metrics.json" --report "$OUT/report"

echo "== 4/4 predict: official test images, with explanation heat-maps for the first 8"
IMAGES=$(cd "$DATA/images" && pwd)   # absolute: paths in a list file are read relative to the list
awk -v d="$IMAGES" '{print d "/" $1}' "$DATA/test_list.txt" > "$OUT/test_images.txt"
head -n 8 "$OUT/test_images.txt" > "$OUT/heatmap_images.txt"
"$CXRVIT" predict --model "$OUT/run" "$OUT/test_images.txt" --out "$OUT/predictions.csv"
"$CXRVIT" predict --model "$OUT/run" "$OUT/heatmap_images.txt" --out "$OUT/heatmap_predictions.csv" --heatmaps "$OUT/heatmaps"

echo "done: $OUT/test_metrics.json, $OUT/report/report.md, $OUT/predictions.csv, $OUT/heatmaps/"
