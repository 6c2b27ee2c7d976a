#!/usr/bin/env bash
# GPU numbers for docs/results/gpu.md in one short run (about 3-5 minutes on one H100/H200-class GPU).
#
#   tools/gpu_bench.sh [OUT_DIR]        # default OUT_DIR: docs/results/gpu
#
# 1) tools/bench_moe.py in bf16 at 16k and 32k tokens (d 768, E 32, h 4, k 2): the MH-MoE layer (on CUDA its
#    default expert path is torch._grouped_mm, sm 9.x only; other capabilities take the per-segment path),
#    the dense block of equal FLOPs and the balanced-bmm oracle, side by side, 2 rounds of 5 timed steps.
# 2) tools/bench_model.py: base dense vs base MH-MoE training steps, bf16-mixed and bf16-true, batch 64 of
#    224 px images + 64 text tokens (16.7k tokens per step).
# Every table lands in OUT_DIR as .txt (what the tools print) and .json, next to nvidia-smi's device line.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$OUT/device.txt"

timeout 240 "$PY" tools/bench_moe.py --device cuda --dtype bfloat16 --tokens 16384 32768 --heads 4 --experts 32 \
    --top-k 2 --methods mhmoe dense oracle --iters 5 --rounds 2 --timeout 100 --out "$OUT/moe_gpu.json" \
    | tee "$OUT/moe_gpu.txt"

timeout 150 "$PY" tools/bench_model.py --device cuda --models base_dense base_mhmoe --batch 64 --img 224 \
    --text-len 64 --steps 10 --warmup 3 --threads 0 --precision bf16-mixed bf16-true --json "$OUT/model_gpu.json" \
    | tee "$OUT/model_gpu.txt"
