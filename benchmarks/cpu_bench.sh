#!/usr/bin/env bash
# The CPU benchmark of issue 4 (no GPU needed; 18 minutes on the 2-core Zen 5 host, over 33 on slower
# ones): training steps of
# VGG-16/19 and ResNet-18/34 at 224x224, batch 32, in two TEE-only baselines (legrace's own, and
# plain PyTorch in channels_last: the ratios use the faster) and legrace (trusted side and an
# in-process accelerator on the same CPU), plus VGG-19 inference and the ResNets with conv outputs
# kept up to a budget (--keep-outputs-mb), then the cap for any split on this host
# (benchmarks/shared_work.py). JSON, PNG charts and a summary table go under $OUT (default
# runs/cpu-bench).
#   OUT=/tmp/out BATCH=32 bash benchmarks/cpu_bench.sh
# glibc's malloc unmaps large freed blocks, so every new activation is page-faulted again; an
# enclave's heap is fixed, so the benchmark keeps freed memory (the same for both modes):
# `legrace bench` and the scripts under benchmarks/ do so themselves (legrace.trusted.heap; --no-keep-heap).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cpu-bench}
BATCH=${BATCH:-32}
PY=${PYTHON:-.venv/bin/python}
for m in vgg16 vgg19 resnet18 resnet34; do
  $PY -m legrace.cli bench --model "$m" --input-size 224 --batch-size "$BATCH" --modes tee_only,tee_only_channels_last,legrace \
      --warmup 1 --repeats 3 --out "$OUT/$m-train"
done
$PY -m legrace.cli bench --model vgg19 --input-size 224 --batch-size "$BATCH" --modes tee_only,tee_only_channels_last,legrace \
    --infer --warmup 1 --repeats 3 --out "$OUT/vgg19-infer"
# the ResNets again, keeping the conv outputs costliest to rebuild in the memory the 1/8 target
# leaves (23 and 48 MiB bring trusted memory to 1/8 of TEE-only's at 224x224, batch 32)
for spec in resnet18:23 resnet34:48; do
  $PY -m legrace.cli bench --model "${spec%%:*}" --input-size 224 --batch-size "$BATCH" \
      --modes tee_only,tee_only_channels_last,legrace --warmup 1 --repeats 3 --keep-outputs-mb "${spec##*:}" \
      --out "$OUT/${spec%%:*}-train-keep${spec##*:}"
done
# the cap that TEE-only's work outside the split convs puts on TEE-only ÷ trusted time on this
# host, for any split (shown beside each time target in the summary)
for spec in vgg16 vgg19 resnet18 resnet34 "vgg19 --infer"; do
  set -- $spec
  $PY benchmarks/shared_work.py --model "$@" --input-size 224 --batch-size "$BATCH" \
      --out "$OUT/shared_work_$1${2:+-infer}.json"
done
$PY benchmarks/summarize_bench.py "$OUT"
