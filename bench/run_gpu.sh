#!/usr/bin/env bash
# The GPU readings of BENCHMARKS.md in one go: about 10 minutes on one H200.
#
#   bash bench/run_gpu.sh [OUT_DIR]     # tables + logs go to OUT_DIR (default bench/results/gpu)
#
# None of these scripts needs Ray: they drive the pipeline's own trainer, indicators and
# retraining loop in-process, so a machine with only torch/torchvision/pandas/pyarrow
# (no Ray) can run them. The step benchmark runs alone (its ratios are timings); the two
# accuracy benchmarks then share the GPU, which they barely load.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BNNAS_BENCH_RESULTS="$out" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
py=${PYTHON:-python3}

nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
timeout 60 "$py" bench/gpu_smoke.py 2>&1 | tee "$out/gpu_smoke.log"
timeout 100 "$py" bench/bench_train_step.py --full 2>&1 | tee "$out/train_step.log"

timeout 900 "$py" bench/bench_rank_stability.py --full --epochs "${RANK_EPOCHS:-20}" \
    >"$out/rank_stability.log" 2>&1 &
timeout 900 "$py" bench/bench_ranking.py --m "${RANKING_M:-30}" --fraction 1 --train-epochs 3 \
    --jobs 12 >"$out/ranking.log" 2>&1 &
wait
tail -n 25 "$out/rank_stability.log" "$out/ranking.log"
