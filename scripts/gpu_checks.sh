#!/usr/bin/env bash
# GPU checks for a session lent one CUDA GPU: one script, about 5 minutes, at most ~10.
#
#   bash scripts/gpu_checks.sh                  # logs under ${OUT:-runs/gpu_checks}
#   PYTHON=/path/to/python bash scripts/gpu_checks.sh
#
# Steps (each under its own `timeout`, so one hung step cannot eat the budget; a failed or
# timed-out step is reported and the next one still runs; exit status 1 if any failed):
#   a. nvidia-smi (GPU name, memory, driver) and torch's view of CUDA         (<= 20 s + 45 s)
#   b. pytest -m gpu (tests/test_gpu.py): the attribution callbacks under accelerator="gpu"
#      and under strategy="ddp" (NCCL) reproduce the CPU accumulators; steering trains under
#      precision="bf16-mixed"                                                (<= 90 s)
#   c. benchmarks/bench_attribution.py --device cuda: optimised vs straightforward
#      attribution on each toy model, 64 items, counted FLOPs, memory 200 vs 2000 items
#      (<= 140 s for toy-llava, <= 120 s for toy-qwen2_5_vl)
#   d. benchmarks/bench_gpu_7b.py: random-weight LLaVA-1.5-7B and Qwen2.5-VL-7B in bf16,
#      prefill at batch 1 and 8 (3 timed iterations), attribution rows on 8 items
#      (2 for the straightforward loop): trimmed from its ~5-10 min defaults   (<= 180 s)
#   e. (STEPS=e2e) the user's commands on the GPU, on the embedded default (generated first if absent):
#      bench_7b_b32: step d at batch 32, prefill only (E2E_BENCH=0 skips it) (<= 75 s; 36 s on one H200)
#      analyze_toy:  analyze.py all --config configs/analyze/toy_llava.yaml on the GPU (fp32;
#                    the README's main job)                               (<= 300 s; > 200 s)
#      steer_bf16:   train.py fit, toy-llava vqa, precision bf16-true with bf16 weights (the 7B
#                    steering configs' settings), on the bank analyze_toy just wrote (<= 75 s; 39 s)
#      pytest_gpu's limit is 60 s here (30 s on one H200). The run folders are packed into
#      $OUT_DIR/e2e_runs.tar.gz; compare them with a CPU run by scripts/compare_runs.py.
#   f. (STEPS=real7b) the real-model configs at the 7B shapes, end to end, on random weights
#      (no download; the toy world's images and annotations stand in for COCO):
#      save_llava7b:    benchmarks/bench_gpu_7b.py --save: a random LLaVA-1.5-7B folder (bf16)  (<= 120 s)
#      analyze_llava7b: analyze.py all --config configs/analyze/llava-1.5-7b.yaml, vqa, 8 discovery
#                       and 8 test images, teacher-forced head utility, one GPU           (<= 300 s)
#      compare_llava7b: train.py compare --config configs/steering/llava-1.5-7b_vqa.yaml, Base and
#                       HONES on that bank, 16 dev images, 1 epoch, 8 test and 8 GQA items  (<= 180 s)
#      save_qwen7b, analyze_qwen7b: the same for Qwen2.5-VL-7B, 4 discovery images        (<= 120 + 180 s)
#      bench_qwen7b:    Qwen2.5-VL-7B prefill at batch 8 and 32 on the same machine         (<= 90 s)
#      The outputs are noise (random weights); what is checked is that every stage runs at these
#      shapes, in bf16, within the GPU's memory, and how long it takes. pytest_gpu comes last here.
#      The set took 9 minutes on one H200 (2026-11-27); its step limits add up to more than a
#      device call's 10 minutes, so run it under an outer `timeout` (the logs are kept per step).
# Worst case (every step at its timeout) just under 10 minutes for the default and e2e sets; the
# default set took about 5 on one H200 (2026-11-27).
#   STEPS=e2e bash scripts/gpu_checks.sh      # a, b, then e instead of c and d
#   STEPS=real7b bash scripts/gpu_checks.sh   # a, f, then b
# The Python must have a CUDA build of torch (the CPU-only venv fails step a's torch check).
# On a bare GPU machine whose python3 already holds torch, lightning and transformers:
#   PYTHON=python3 PYTHONPATH=$PWD bash scripts/gpu_checks.sh
# (packages it lacks, e.g. jsonargparse or datasets, install with pip or carry as wheels).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT:-runs/gpu_checks}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1  # logs keep what a step printed before a timeout
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
failed=0

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, tee its output to NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/$name.log" rc=0 start=$SECONDS
    echo "== $name (timeout ${limit}s): $*" | tee -a "$SUMMARY"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$log" || rc=$?
    local took=$((SECONDS - start)) outcome="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        outcome="TIMED OUT after ${limit}s (rc $rc)"
    elif [ "$rc" -ne 0 ]; then
        outcome="FAILED (rc $rc)"
    fi
    [ "$outcome" = "ok" ] || failed=1
    echo "-- $name: $outcome in ${took}s; log $log" | tee -a "$SUMMARY"
}

# a. the GPU, and whether this Python's torch sees it
step nvidia_smi 20 nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv
step torch_cuda 45 "$PY" -c 'import torch; assert torch.cuda.is_available(), f"torch {torch.__version__}: no CUDA"; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")'

# b. GPU-marked tests (tests/test_gpu.py): callbacks on cuda = CPU, DDP over NCCL, bf16-mixed steering
pytest_gpu() {
    step pytest_gpu "$([ "${STEPS:-default}" = default ] && echo 90 || echo 60)" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
}
[ "${STEPS:-default}" = real7b ] || pytest_gpu

if [ "${STEPS:-default}" = "real7b" ]; then
    RUNS=$(mktemp -d)
    MODELS=${MODELS_DIR:-/tmp/hones_random_7b}
    [ -e toyworld_data/toyworld.json ] || "$PY" -m hones.data.toyworld --out toyworld_data | tee -a "$SUMMARY"
    TOY=(--data.annotation_file toyworld_data/coco/unified.json --data.image_root toyworld_data/coco/images
         --data.num_workers 2)
    ONE_GPU=(--trainer.accelerator gpu --trainer.devices 1 --trainer.strategy auto)
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 >"$OUT_DIR/gpu_memory.log" 2>&1 &
    SAMPLER=$!
    trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT
    step save_llava7b 120 "$PY" benchmarks/bench_gpu_7b.py --arch llava --save "$MODELS/llava"
    step analyze_llava7b 300 "$PY" analyze.py all --config configs/analyze/llava-1.5-7b.yaml \
        --model "$MODELS/llava" --model_name llava-1.5-7b-random --tasks '[vqa]' "${TOY[@]}" \
        --discovery.split_file toyworld_data/splits/discovery.json --discovery.limit 8 \
        --test.split_file toyworld_data/splits/test.json --test.limit 8 \
        --heads.utility teacher_forced "${ONE_GPU[@]}" --output_root "$RUNS/analyze"
    step compare_llava7b 180 "$PY" train.py compare --config configs/steering/llava-1.5-7b_vqa.yaml \
        --model.model "$MODELS/llava" --model.bank "$RUNS/analyze/llava-1.5-7b-random/vqa/bank_hones.json" \
        --model.output_dir "$RUNS/steering/vqa" --trainer.logger.init_args.save_dir "$RUNS/steering/vqa" \
        "${TOY[@]}" --data.split_file toyworld_data/splits/dev.json --data.limit 16 "${ONE_GPU[@]}" \
        --trainer.max_epochs 1 --compare.output_dir "$RUNS/steering/vqa/compare" --compare.methods '[base, hones]' \
        --compare.test_split_file toyworld_data/splits/test.json --compare.test_limit 8 \
        --compare.ood.annotation_file toyworld_data/gqa/questions.json \
        --compare.ood.image_root toyworld_data/gqa/images --compare.ood.limit 8
    rm -rf "$MODELS/llava"
    step save_qwen7b 120 "$PY" benchmarks/bench_gpu_7b.py --arch qwen2_5_vl --save "$MODELS/qwen"
    step analyze_qwen7b 180 "$PY" analyze.py all --config configs/analyze/qwen2.5-vl-7b.yaml \
        --model "$MODELS/qwen" --model_name qwen2.5-vl-7b-random --tasks '[vqa]' "${TOY[@]}" \
        --discovery.split_file toyworld_data/splits/discovery.json --discovery.limit 4 \
        --test.split_file toyworld_data/splits/test.json --test.limit 8 \
        --heads.utility teacher_forced "${ONE_GPU[@]}" --output_root "$RUNS/analyze"
    rm -rf "$MODELS/qwen"
    step bench_qwen7b 90 "$PY" benchmarks/bench_gpu_7b.py --arch qwen2_5_vl --batch-sizes 8 32 --iterations 3 --attr-items 0
    kill "$SAMPLER" 2>/dev/null || true
    pytest_gpu
    tar -czf "$OUT_DIR/real7b_runs.tar.gz" --exclude='*.safetensors' --exclude='tensorboard' --exclude='tb' -C "$RUNS" .
elif [ "${STEPS:-default}" = "e2e" ]; then
    RUNS=$(mktemp -d)
    [ -e toyworld_data/toyworld.json ] || "$PY" -m hones.data.toyworld --out toyworld_data | tee -a "$SUMMARY"
    [ "${E2E_BENCH:-1}" = 0 ] || step bench_7b_b32 75 "$PY" benchmarks/bench_gpu_7b.py --arch both --batch-sizes 32 --iterations 3 --attr-items 0
    step analyze_toy 300 "$PY" analyze.py all --config configs/analyze/toy_llava.yaml \
        --trainer.accelerator gpu --output_root "$RUNS/analyze"
    step steer_bf16 75 "$PY" train.py fit --config configs/steering/toy_llava_vqa.yaml \
        --trainer.accelerator gpu --trainer.precision bf16-true --model.dtype bf16 \
        --model.bank "$RUNS/analyze/toy-llava/vqa/bank_hones.json" \
        --model.output_dir "$RUNS/steering/toy-llava/vqa" --trainer.logger.init_args.save_dir "$RUNS/steering/toy-llava/vqa"
    tar -czf "$OUT_DIR/e2e_runs.tar.gz" -C "$RUNS" .
else
    # c. optimised vs straightforward attribution on the GPU (toy model), counted FLOPs, memory rows
    step bench_attribution 140 "$PY" benchmarks/bench_attribution.py --device cuda --items 64 --metric-items 8 --memory-items 200 2000
    step bench_attribution_qwen 120 "$PY" benchmarks/bench_attribution.py --device cuda --model models/toy-qwen2_5_vl --items 64 --metric-items 8 --memory-items 200 2000

    # d. 7B shapes in bf16 (random weights, built on the GPU; no download)
    step bench_gpu_7b 180 "$PY" benchmarks/bench_gpu_7b.py --arch both --batch-sizes 1 8 --iterations 3 --attr-items 8 --plain-items 2
fi

echo "== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$failed"
