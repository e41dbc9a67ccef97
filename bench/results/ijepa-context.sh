#!/usr/bin/env bash
# Issue 20, a diagnostic registered 6 December 12:35 UTC, while the I-JEPA arm (bench/arms/sample-cv2-ijepa.yaml)
# pre-trains fold 0 and before any read-out of it: NOT part of that arm's decision rule, reported beside it.
#
# Why: I-JEPA exports its EMA *target* encoder. Over ~800 steps with momentum 0.996 rising towards 1, about 15 % of
# the target's weights are still its random initialisation (the product of the momenta; docs/ssl.md). A weak
# target read-out then cannot tell "I-JEPA learned little here" from "the average has not caught up". The context
# encoder, the network the gradients train, tells them apart. Its read-out: the product's (frozen, patch-token mean
# at 224 px, cross-fitted probe), scored on the fold's held-out patients, against the target's read-out of the
# same stage (bench/compare_arms.py, paired).
#
# Rule, fixed now: if the context encoder's read-out leads the target's by more than +0.02 mean AUROC (fold 0, seed
# 0), the EMA's lag limits the exported target at this step count, and a follow-up I-JEPA arm with a lower base
# momentum (e.g. 0.99) is worth registering; otherwise the target read-out stands as I-JEPA's answer.
#
#   bash bench/results/ijepa-context.sh RUNS FOLD     # RUNS holds sample-cache160 and cv2-tokavg-seeds
#
# The plan is written per fold (its arm starts from that fold's own context encoder, a file made here), so it is
# not a shipped arms file: a clone could not load it before the stage exists.
set -euo pipefail
RUNS=$(cd "${1:?RUNS folder}" && pwd)
FOLD=${2:?fold number}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
STAGE=$RUNS/cv2-tokavg-seeds/fold$FOLD/pretrain-ijepa224s
OUT=$RUNS/cv2-ijepa-ctx-fold$FOLD
CTX=$RUNS/ijepa-ctx/fold$FOLD-context.safetensors
test -f "$STAGE/backbone.safetensors" || { echo "error: $STAGE has not finished (no backbone.safetensors)" >&2; exit 1; }
# Exported once: before save_weights (6 December) safetensors wrote its metadata in a per-process order, so the
# fold-0 file's re-export has another sha256, and the harness (which pins an init file's sha256) would refuse it.
[ -f "$CTX" ] || "$REPO/.venv/bin/python" "$REPO/bench/ijepa_context.py" "$STAGE/last.pt" "$CTX"
mkdir -p "$OUT/fold$FOLD"
[ -e "$OUT/fold$FOLD/probe-random-avg" ] || cp -al "$RUNS/cv2-tokavg-seeds/fold$FOLD/probe-random-avg" "$OUT/fold$FOLD/"
cat > "$OUT.yaml" <<PLAN
reference: probe-random-avg
protocol: cv
folds: 2
seeds: [0]
run_folds: [$FOLD]
overrides: [model.img_size=128, schedule.epochs=30]
arms:
  - {name: probe-random-avg, recipe: probe-random, overrides: [model.img_size=224, model.global_pool=avg]}
  - {name: ijepa224s-ctx-probe-avg, recipe: probe-random, init: $CTX, overrides: [model.img_size=224, model.global_pool=avg]}
PLAN
"$REPO/.venv/bin/python" -m cxrvit bench arms "$OUT.yaml" --data "$RUNS/sample-cache160" --out "$OUT" --quiet
# --folds takes several numbers, so it comes after the positional arguments
"$REPO/.venv/bin/python" "$REPO/bench/compare_arms.py" --data "$RUNS/sample-cache160" \
  "$RUNS/cv2-tokavg-seeds" ijepa224s-probe-avg "$OUT" ijepa224s-ctx-probe-avg --names target context \
  --json "$OUT/compare-target-context.json" --folds "$FOLD"
