#!/usr/bin/env bash
# Copy what an arms benchmark left in OUT into the repository, less weights and checkpoints (83-280 MB each):
# per fold and arm heldout.npz + run/config.yaml + run/metrics.jsonl, per pre-training stage config.yaml +
# cost.json + metrics.jsonl, and the scored tables (results*.md/.json, those of --reference too). A session's
# machine may not outlive it; commits do, so run this as each arm lands. Copy the fold*/ folders back into an OUT
# to continue the benchmark: finished arms are read back without their weights.
#
#   bash bench/results/collect.sh OUT DEST      # e.g. runs/cv2-scaling bench/results/cv2-scaling
set -euo pipefail
OUT=${1:?OUT folder of cxrvit bench arms}
DEST=${2:?destination under bench/results}
mkdir -p "$DEST"
for dir in "$OUT"/fold*/*/; do
  rel=${dir#"$OUT"/}; rel=${rel%/}
  if [ -f "$dir/heldout.npz" ]; then
    mkdir -p "$DEST/$rel/run"
    cp "$dir/heldout.npz" "$DEST/$rel/"
    for f in config.yaml metrics.jsonl; do [ -f "$dir/run/$f" ] && cp "$dir/run/$f" "$DEST/$rel/run/"; done
  elif [ -f "$dir/cost.json" ]; then
    mkdir -p "$DEST/$rel"
    for f in config.yaml cost.json metrics.jsonl; do [ -f "$dir/$f" ] && cp "$dir/$f" "$DEST/$rel/"; done
  fi
done
for f in "$OUT"/results*.md "$OUT"/results*.json; do [ -f "$f" ] && cp "$f" "$DEST/"; done
echo "collected $(find "$DEST" -name heldout.npz | wc -l) arm-folds and $(find "$DEST" -name cost.json | wc -l) pre-trainings into $DEST"
