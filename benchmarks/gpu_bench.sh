#!/usr/bin/env bash
# The GPU benchmark of issue 4, sized for one call on a lent H100 (about 5 minutes):
# training steps of VGG-16/19 and ResNet-18/34 at 224x224, batch 32, in tee_only (CPU, the same
# trusted runtime and threads), legrace (trusted side on the CPU, accelerator on the GPU) and
# gpu_only, plus VGG-19 inference and VGG-16 with the two legs run one after the other.
# JSON and PNG charts go under $OUT (default runs/gpu-bench).
#   OUT=/tmp/out bash benchmarks/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-bench}
PY=${PYTHON:-python3}
# Keep freed heap memory in the process (as an enclave's fixed heap does), for every mode alike.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296}
if ! $PY -c "import legrace" 2>/dev/null; then
  $PY -m pip install --quiet --no-deps -e . && $PY -m pip install --quiet opacus scikit-learn tqdm matplotlib
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.__version__, torch.cuda.get_device_name(0), torch.get_num_threads(), 'CPU threads')"
for m in vgg16 vgg19 resnet18 resnet34; do
  $PY -m legrace.cli bench --model "$m" --input-size 224 --batch-size 32 --modes tee_only,legrace,gpu_only \
      --accelerator cuda --warmup 1 --repeats 3 --out "$OUT/$m-train"
done
$PY -m legrace.cli bench --model vgg19 --input-size 224 --batch-size 32 --modes tee_only,legrace,gpu_only \
    --accelerator cuda --infer --warmup 1 --repeats 3 --out "$OUT/vgg19-infer"
# the two legs one after the other instead of concurrently (--overlap is on above), for comparison
$PY -m legrace.cli bench --model vgg16 --input-size 224 --batch-size 32 --modes legrace \
    --accelerator cuda --no-overlap --warmup 1 --repeats 3 --out "$OUT/vgg16-train-sequential"
$PY benchmarks/summarize_bench.py "$OUT"
