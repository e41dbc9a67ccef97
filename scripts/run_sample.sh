#!/usr/bin/env bash
# The main job on the embedded real sample, end to end:
#   prepare -> pre-train (MAE, once) -> fine-tune (improved) -> evaluate on NIH's official test images
#   -> predict with heat-maps.
#
#   bash scripts/run_sample.sh [DATA_DIR] [OUT_DIR] [extra `cxrvit train --set` overrides...]
#
# DATA_DIR defaults to sample/nih-sample (shipped with the repository); OUT_DIR to runs/sample.
# The pre-training stage sees the official train_val images and the 243 unlabelled Hannover radiographs
# (sample/other-cxr), never the official test images. It runs once: a later run reuses
# OUT_DIR/pretrain/backbone.safetensors, and a killed one resumes from its checkpoint, as does training.
# Timings measured on the 2-core development VM are in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-sample/nih-sample}
OUT=${2:-runs/sample}
shift $(( $# > 2 ? 2 : $# ))
CXRVIT=${CXRVIT:-.venv/bin/cxrvit}
EPOCHS=${EPOCHS:-20}
EXTRA=${PRETRAIN_EXTRA:-sample/other-cxr/hannover/png}   # unlabelled images for pre-training ("" for none)

echo "== 1/5 prepare: decode $DATA once into a 160-px cache"
"$CXRVIT" prepare --data "$DATA" --out "$OUT/cache" --size 160
"$CXRVIT" data-summary "$OUT/cache"
PRE_DATA=("$OUT/cache")
if [ -n "$EXTRA" ]; then
  "$CXRVIT" prepare --data "$EXTRA" --out "$OUT/cache-extra" --size 160
  PRE_DATA+=("$OUT/cache-extra")
fi

if [ -f "$OUT/pretrain/backbone.safetensors" ]; then
  echo "== 2/5 pre-train: $OUT/pretrain is finished, reusing its backbone (delete it to pre-train again)"
else
  echo "== 2/5 pre-train: MAE (recipe mae-small, 128 px, 30 epochs) on the train_val images + $EXTRA"
  "$CXRVIT" pretrain --method mae --recipe mae-small --data "${PRE_DATA[@]}" --out "$OUT/pretrain"
fi

if [ -f "$OUT/run/bundle.json" ]; then
  echo "== 3/5 fine-tune: $OUT/run is finished (delete it to train again)"
elif [ -f "$OUT/run/last.pt" ]; then
  echo "== 3/5 fine-tune: resuming the killed run in $OUT/run with its saved config"
  "$CXRVIT" train --resume "$OUT/run"
else
  echo "== 3/5 fine-tune: improved from the MAE backbone, 128 px, $EPOCHS epochs (official train_val -> train/val by patient)"
  "$CXRVIT" train --recipe improved --data "$OUT/cache" --out "$OUT/run" --init "$OUT/pretrain/backbone.safetensors" \
    --set model.img_size=128 --set schedule.epochs="$EPOCHS" "$@"
fi

echo "== 4/5 evaluate on NIH's official test images (never used for pre-training, training or thresholds)"
"$CXRVIT" eval --model "$OUT/run" --data "$OUT/cache" --split test --json "$OUT/test_metrics.json" --report "$OUT/report"

echo "== 5/5 predict: official test images, with explanation heat-maps for the first 8"
IMAGES=$(cd "$DATA/images" && pwd)   # absolute: paths in a list file are read relative to the list
awk -v d="$IMAGES" '{print d "/" $1}' "$DATA/test_list.txt" > "$OUT/test_images.txt"
head -n 8 "$OUT/test_images.txt" > "$OUT/heatmap_images.txt"
"$CXRVIT" predict --model "$OUT/run" "$OUT/test_images.txt" --out "$OUT/predictions.csv"
"$CXRVIT" predict --model "$OUT/run" "$OUT/heatmap_images.txt" --out "$OUT/heatmap_predictions.csv" --heatmaps "$OUT/heatmaps"

echo "done: $OUT/test_metrics.json, $OUT/report/report.md, $OUT/predictions.csv, $OUT/heatmaps/"
