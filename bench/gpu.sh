#!/usr/bin/env bash
# One CUDA GPU, the real sample, <= 10 minutes (issue 10, item 5):
#   1 env         nvidia-smi, torch/CUDA/NCCL versions                      -> runs/gpu/env.txt
#   2 prepare     the NIH sample and the Hannover radiographs as 256-px caches -> runs/gpu/cache, cache-hannover
#   3 cuda_check  bf16 autocast vs fp32, the engine's pinned-memory loader    -> runs/gpu/cuda_check.json
#   4 ddp_check   torchrun, 1 process: NCCL process group + DDP train step   -> runs/gpu/ddp_check.json
#   5 torchrun_train  `torchrun --nproc_per_node=1 -m cxrvit train`, 1 epoch at 224 px -> runs/gpu/torchrun-train
#   6 throughput  bench/model.py at 224 px, batch 64 and 256: img/s, MFU vs the measured bf16 matmul ceiling
#   7 arms        cxrvit bench arms bench/arms/sample-cv2-learned-gpu.yaml (224 px, full schedules) with the time left
#   8 summary     runs/gpu/summary.md: every stage's status and time, the checks, throughput/MFU, the arms table
#
#   bash bench/gpu.sh                          # on the GPU machine; rerun to resume a timed-out arms stage
#   ONLY_ARMS=1 bash bench/gpu.sh              # after a timed-out arms stage: skip stages 3-6, resume the arms
#   CXRVIT_GPU_DRYRUN=1 bash bench/gpu.sh      # any CPU: every stage with tiny settings -> runs/gpu-dryrun
#
# Data: ../shared/data/nih-sample (1,099 NIH PNGs at 512 px) when present, else the embedded sample/nih-sample
# (the same images at 160 px, upsampled by the cache); DATA=... overrides. Every stage has its own time limit;
# a failed or timed-out stage is recorded and the script goes on (except prepare), then exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

DRYRUN=${CXRVIT_GPU_DRYRUN:-0}
ONLY_ARMS=${ONLY_ARMS:-0}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUDGET_S=${BUDGET_S:-600}           # the whole script, wall clock
START=$(date +%s)
# Stage 7's plan: issue 20's learned candidates at 224 px with GPU budgets; ARMS_FILE=bench/arms/sample-cv2-gpu.yaml
# runs the older four-arm comparison (issue 10) instead.
ARMS_FILE=${ARMS_FILE:-bench/arms/sample-cv2-learned-gpu.yaml}

if [ -z "${DATA:-}" ]; then
  for d in ../shared/data/nih-sample shared/data/nih-sample sample/nih-sample; do
    if [ -d "$d/images" ]; then DATA=$d; break; fi
  done
fi
HANNOVER=${HANNOVER:-sample/other-cxr/hannover/png}

if [ "$DRYRUN" = 1 ]; then
  OUT=runs/gpu-dryrun; DEVICE=cpu; CACHE_PX=64
  # A GPU resolves `precision: auto` to bf16, so the dry run does too (emulated, slower, on a CPU
  # without native bf16): the stages must run the precision path they will run on the GPU (issue 19).
  export CXRVIT_FORCE_BF16=1
  CHECK_ARGS=(--arch vit_tiny --size 64 --batch 4 --loader-batch 16)
  DDP_ARGS=(--arch vit_tiny --size 64 --batch 4)
  TRAIN_SETS=(--set model.arch=vit_tiny --set model.img_size=32 --set schedule.epochs=1 --set schedule.batch_size=32)
  MODEL_ARGS=(--sizes 64 --repeats 1 --threads "$(nproc)")
  BATCHES=(2)
  BOOTSTRAP=200
else
  OUT=runs/gpu; DEVICE=cuda; CACHE_PX=256
  CHECK_ARGS=(--arch vit_small --size 224 --batch 16 --loader-batch 64)
  DDP_ARGS=(--arch vit_small --size 224 --batch 16)
  TRAIN_SETS=(--set model.img_size=224 --set schedule.epochs=1)
  MODEL_ARGS=(--sizes 224 --repeats 20)
  BATCHES=(64 256)
  BOOTSTRAP=1000
  # cxrvit's engine asks for deterministic kernels on CUDA; cuBLAS needs this to honour it
  export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
fi
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME LIMIT_S CMD...: run with a time limit, log to $LOGS/NAME.log, record "name rc seconds limit"
stage() {
  local name=$1 limit=$2 t0 rc=0
  shift 2
  t0=$(date +%s)
  echo "== [$(elapsed) s] $name (limit ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/stages.tsv"
  if [ "$rc" != 0 ]; then
    echo "   $name: exit $rc ($([ "$rc" = 124 ] && echo "time limit" || echo failed)); last lines of $LOGS/$name.log:"
    tail -n 15 "$LOGS/$name.log" | sed 's/^/   | /'
    FAILED=1
  fi
  return "$rc"
}

# -- 1 env: is there a GPU at all? --------------------------------------------------------------
echo "== bench/gpu.sh: OUT=$OUT DEVICE=$DEVICE DATA=${DATA:-none} dry-run=$DRYRUN budget=${BUDGET_S} s"
if [ -z "${DATA:-}" ]; then
  echo "no NIH sample found (../shared/data/nih-sample, shared/data/nih-sample, sample/nih-sample); set DATA=" >&2
  exit 2
fi
if [ "$DRYRUN" != 1 ]; then
  if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi > /dev/null 2>&1; then
    echo "bench/gpu.sh needs an NVIDIA GPU: nvidia-smi is missing or sees no GPU." >&2
    echo "To test every stage of this script on a CPU with tiny settings: CXRVIT_GPU_DRYRUN=1 bash bench/gpu.sh" >&2
    exit 3
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: nvidia-smi sees a GPU but torch.cuda.is_available() is False in $PY" >&2
    echo "($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')):" \
         "install a CUDA build, e.g. TORCH_INDEX_URL=<pytorch wheel index for your CUDA> bash scripts/setup.sh" >&2
    exit 3
  fi
fi
LOGS=$OUT/logs
mkdir -p "$LOGS"
[ "$ONLY_ARMS" = 1 ] || : > "$OUT/stages.tsv"     # ONLY_ARMS keeps the earlier stages' rows
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)$(git diff --quiet 2>/dev/null || echo +dirty)"
  echo "mode: $([ "$DRYRUN" = 1 ] && echo 'CPU DRY RUN (tiny settings, bf16 forced as on a GPU: these numbers say nothing about a GPU)' || echo GPU)"
  echo "data: $DATA (+ unlabelled $HANNOVER for pre-training), cache ${CACHE_PX} px"
  if [ "$DRYRUN" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv,noheader
  else
    echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuda available', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '| NCCL', '.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else 'n/a')"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# -- 2 prepare (resumable; a finished cache is reused) -----------------------------------------
stage prepare 150 "$PY" -m cxrvit prepare --data "$DATA" --out "$OUT/cache" --size "$CACHE_PX" --no-progress || exit 1
stage prepare_hannover 90 "$PY" -m cxrvit prepare --data "$HANNOVER" --out "$OUT/cache-hannover" --size "$CACHE_PX" \
  --unlabelled --no-progress || exit 1

if [ "$ONLY_ARMS" != 1 ]; then
# -- 3 bf16 autocast + pinned-memory loader ----------------------------------------------------
stage cuda_check 120 "$PY" bench/cuda_check.py check --device "$DEVICE" --data "$OUT/cache" \
  --json "$OUT/cuda_check.json" "${CHECK_ARGS[@]}" || true

# -- 4 DDP over NCCL with one process -----------------------------------------------------------
stage ddp_check 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  bench/cuda_check.py ddp --device "$DEVICE" --json "$OUT/ddp_check.json" "${DDP_ARGS[@]}" || true

# -- 5 the training CLI under torchrun, one epoch ------------------------------------------------
rm -rf "$OUT/torchrun-train"     # a fresh 1-epoch run each time (cxrvit refuses to overwrite a run)
stage torchrun_train 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m cxrvit train \
  --recipe finetune --data "$OUT/cache" --out "$OUT/torchrun-train" --device "$DEVICE" --no-progress \
  "${TRAIN_SETS[@]}" || true

# -- 6 throughput and MFU against the measured matmul ceiling -----------------------------------
for b in "${BATCHES[@]}"; do
  rm -f "$OUT/throughput-b$b.md"
  stage "throughput_b$b" 120 "$PY" bench/model.py --device "$DEVICE" --batch "$b" "${MODEL_ARGS[@]}" \
    --write "$OUT/throughput-b$b.md" --json "$OUT/throughput-b$b.json" || true
done
fi

# -- 7 the decisive comparison, with whatever time is left ---------------------------------------
if [ "$DRYRUN" = 1 ]; then
  PLAN=$OUT/arms-dryrun.yaml
  stage arms_plan 60 "$PY" bench/cuda_check.py plan --arms "$ARMS_FILE" --out "$PLAN" --tiny \
    --extra "$OUT/cache-hannover" || true
else
  PLAN=$ARMS_FILE                # names its extra caches (runs/gpu/cache-hannover), if any, itself
fi
LEFT=$(( BUDGET_S - $(elapsed) - 25 ))
if [ "$LEFT" -lt 60 ]; then
  echo "== arms: only ${LEFT} s of the ${BUDGET_S}-s budget left; skipped (rerun to run it: it resumes)"
  printf 'arms\tskip\t0\t%s\n' "$LEFT" >> "$OUT/stages.tsv"
  FAILED=1
else
  stage arms "$LEFT" "$PY" -m cxrvit bench arms "$PLAN" --data "$OUT/cache" --out "$OUT/arms" \
    --device "$DEVICE" --bootstrap "$BOOTSTRAP" --quiet || true
fi

# -- 8 summary ----------------------------------------------------------------------------------
"$PY" bench/gpu_summary.py --out "$OUT"
echo "== [$(elapsed) s] done: $OUT/summary.md$([ "$FAILED" = 1 ] && echo ' (some stages failed or timed out: see the table)')"
exit "$FAILED"
