#!/usr/bin/env bash
# The prepared GPU check (one H200, under five minutes): correctness against float64 in fp32
# and bf16 at realistic sizes, bitwise determinism, B = 2^20 on one GPU, then the loss benchmark
# sweep in bf16. Writes JSON, CSV and PNG to OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT]
#
# Notes for the multi-GPU plan (scale-out issue): run
#   torchrun --nproc_per_node N benchmarks/bench_train.py --distributed
# with N = 1, 2, 4, 8 on one host and expect near-linear interactions/s while the gathered
# negatives grow with N (the loss's FLOPs grow as N^2 per rank: watch the ratio).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
# the device image has torch and triton; install our package over it without dependencies
# (kernels/ becomes recsys_ccl.kernels only through the install)
python3 -m pip install -q --no-deps --no-build-isolation -e . || true
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$out/nvidia_smi.csv"
timeout 120 python3 benchmarks/gpu_check.py "$out"
timeout 150 python3 benchmarks/bench_loss.py --device cuda --dtype bf16 --dims 64 128 256 \
  --batch-sizes 1024 4096 16384 65536 --reps 5 --out "$out"
