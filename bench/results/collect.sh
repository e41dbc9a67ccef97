#!/usr/bin/env bash
# Copy what an arms benchmark left in OUT into the repository, less weights and checkpoints (83-280 MB each):
# per fold and arm heldout.npz + run/config.yaml + run/metrics.jsonl, per pre-training stage config.yaml +
# cost.json + metrics.jsonl, and the scored tables (results*.md/.json, those of --reference too). A session's
# machine may not outlive it; commits do, so run this as each arm lands. Copy the fold*/ folders back into an OUT
# to continue the benchmark: finished arms are read back without their weights; an arm that still needs a
# collected pre-training stage is refused (put the stage's weights back, or delete its cost.json to run it again).
#
#   bash bench/results/collect.sh OUT DEST [STEM [NAME...]]    # e.g. runs/cv2-scaling bench/results/cv2-scaling
#
# STEM: the tables' file stem (`cxrvit bench arms --tables STEM`): only OUT/STEM.md|json and
# OUT/STEM-vs-*.md|json are copied (without it, every OUT/results*.md|json). NAME...: only fold folders with these names (shell globs, e.g. 'mae224x-*' 'pretrain-mae224x*'), for a
# plan that shares its OUT with other plans whose folders are committed elsewhere.
set -euo pipefail
OUT=${1:?OUT folder of cxrvit bench arms}
DEST=${2:?destination under bench/results}
STEM=${3:-}
shift $(( $# < 3 ? $# : 3 ))
NAMES=("$@")
wanted() {
  [ ${#NAMES[@]} -eq 0 ] && return 0
  local pattern
  for pattern in "${NAMES[@]}"; do
    # shellcheck disable=SC2053  # the pattern is meant to glob
    [[ $1 == $pattern ]] && return 0
  done
  return 1
}
mkdir -p "$DEST"
for dir in "$OUT"/fold*/*/; do
  rel=${dir#"$OUT"/}; rel=${rel%/}
  wanted "$(basename "$rel")" || continue
  if [ -f "$dir/heldout.npz" ]; then
    mkdir -p "$DEST/$rel/run"
    cp "$dir/heldout.npz" "$DEST/$rel/"
    for f in config.yaml metrics.jsonl; do [ -f "$dir/run/$f" ] && cp "$dir/run/$f" "$DEST/$rel/run/"; done
  elif [ -f "$dir/cost.json" ]; then
    mkdir -p "$DEST/$rel"
    for f in config.yaml cost.json metrics.jsonl; do [ -f "$dir/$f" ] && cp "$dir/$f" "$DEST/$rel/"; done
  fi
done
if [ -n "$STEM" ]; then TABLES=("$OUT/$STEM".md "$OUT/$STEM".json "$OUT/$STEM"-vs-*.md "$OUT/$STEM"-vs-*.json)
else TABLES=("$OUT"/results*.md "$OUT"/results*.json); fi
for f in "${TABLES[@]}"; do
  [ -f "$f" ] && cp "$f" "$DEST/"
done
echo "collected $(find "$DEST" -name heldout.npz | wc -l) arm-folds and $(find "$DEST" -name cost.json | wc -l) pre-trainings into $DEST"
