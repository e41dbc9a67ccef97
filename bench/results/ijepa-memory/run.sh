#!/usr/bin/env bash
# Exploratory, 6 December 2026 (not a benchmark target): does I-JEPA's resident memory on CPU grow because of
# oneDNN's per-shape primitive cache? I-JEPA's context length changes every step, so every step can meet new
# matrix shapes. The same short run twice (224 px, batch 16, 3 epochs = 177 steps on the sample's 956 train_val
# images, glibc's allocator), with oneDNN's cache at its default and switched off; RSS sampled every 5 s into
# rss-<arm>.log (time, RSS kB, last logged step). Stops each run when training ends (the final probe is not measured).
#
#   bash bench/results/ijepa-memory/run.sh CACHE OUT       # e.g. runs/sample-cache160 /tmp/ijepa-memory
set -uo pipefail
CACHE=${1:?a cxrvit cache}
OUT=${2:?an output folder}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
mkdir -p "$OUT"
for arm in default nocache; do
  rm -rf "${OUT:?}/$arm" "$OUT/rss-$arm.log"
  if [ $arm = nocache ]; then export ONEDNN_PRIMITIVE_CACHE_CAPACITY=0; fi
  CXRVIT_MALLOC=system "$REPO/.venv/bin/python" -m cxrvit pretrain --method ijepa --data "$CACHE" --out "$OUT/$arm" \
    --set schedule.batch_size=16 --set schedule.epochs=3 --set optim.warmup_epochs=1 --set probe.every_epochs=0 \
    --set engine.log_every=20 > "$OUT/$arm.log" 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    echo "$(date -u +%T) $(ps -o rss= -p $pid) $(tail -c 300 "$OUT/$arm/metrics.jsonl" 2>/dev/null | grep -o '"step": [0-9]*' | tail -1)" >> "$OUT/rss-$arm.log"
    grep -q '"kind": "probe"' "$OUT/$arm/metrics.jsonl" 2>/dev/null && { kill $pid; break; }
    sleep 5
  done
  wait $pid 2>/dev/null
  unset ONEDNN_PRIMITIVE_CACHE_CAPACITY
done
for arm in default nocache; do
  echo "$arm: peak RSS $(awk '{print $2}' "$OUT/rss-$arm.log" | sort -n | tail -1) kB; $(grep 'img/s' "$OUT/$arm.log" | tail -1)"
done
