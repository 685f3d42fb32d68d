#!/usr/bin/env bash
# Issue 7 on one lent H100 in a single call (<= 9 min): model-level throughput of dense / cola / elas at 1B and
# 350M (training steps and forward-only prefill, bf16, SDPA attention, fused ELAS kernels), then a short quality
# run (60M on the shipped Python-docs corpus). Run by the device tool in the repo root; results go to $OUT (or
# ./perf_out). Needs the wheels in .whl/ (megatron-core, psutil, ... for the GPU image's Python), as
# benchmarks/gpu_checks.sh; carry .whl. Plots need matplotlib, which the GPU image lacks: afterwards, here,
#   elas-bench plot OUT/throughput_1b ; elas-bench plot OUT/throughput_350m ;
#   elas-bench quality --report-only --out OUT/quality ...   (see docs/performance.md)
# Every phase writes its results as it goes and has its own time cap, so a cut-off phase still leaves its rows.
#   PHASES="1b_train 1b_prefill 350m_train 350m_prefill quality" (default: all, in this order)
#   BUDGET_S=530 (the whole call), QUALITY_STEPS=400
#   CPU check of this script: SKIP_WHEELS=1 BENCH_EXTRA="--tiny --seq-lens 16 --micro-batches 1,2
#     --inference-micro-batches 1,2" QUALITY_EXTRA="--tiny" QUALITY_STEPS=4 bash benchmarks/run_performance.sh
set -uo pipefail
OUT=${OUT:-perf_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-530}
PHASES=${PHASES:-"1b_train 1b_prefill 350m_train 350m_prefill quality"}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
# fewer fragmentation OOMs, so the largest batch that fits is the model's, not the allocator's
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [[ -z "${SKIP_WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
python3 -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'mcore', m.__version__)" | tee -a "$OUT/device.txt"

BENCH="python3 -m elas_megatron.cli.bench"
# seconds a phase may take: its cap, or what is left of the budget (minus a margin to copy files)
allow() { local left=$(( BUDGET_S - SECONDS - 10 )); (( left < $1 )) && echo $(( left > 0 ? left : 1 )) || echo "$1"; }
want() { [[ " $PHASES " == *" $1 "* ]]; }
run_phase() {  # name cap command...
    local name=$1 cap; cap=$(allow "$2"); shift 2
    echo "== $name (up to ${cap} s; ${SECONDS} s used)"
    # shellcheck disable=SC2086  # BENCH_EXTRA / QUALITY_EXTRA are word lists
    timeout -k 15 "$cap" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after ${SECONDS} s"; grep -E "^\| (\*\*elas|dense \||cola \||elas \||[0-9a-z]+_(dense|cola|elas))" "$OUT/$name.log" | head -12
}
# Grids: the memory estimate (training/memory.py, within 90 % of 79.6 GiB) puts the largest micro-batch of 1024
# tokens at 24 (1B dense and cola), 40 (1B elas), 60 / 56 / 76 (350M dense / cola / elas); steps of 4 (1B) and
# 8 (350M) around those resolve the max-batch ratio to ~15 %. Prefill keeps no activations: large batches fit.
TRAIN=(--steps 3 --warmup 2 --profile-steps 1 --isolation variant --seq-lens 1024)
PREFILL=(--no-train --inference --steps 3 --warmup 1 --profile-steps 1 --isolation variant --seq-lens 1024)
want 1b_train && run_phase 1b_train 180 $BENCH throughput configs/model/1b.yaml "${TRAIN[@]}" \
    --micro-batches 8,16,20,24,28,32,36,40,44,48 --out "$OUT/throughput_1b" ${BENCH_EXTRA:-}
want 1b_prefill && run_phase 1b_prefill 70 $BENCH throughput configs/model/1b.yaml "${PREFILL[@]}" \
    --inference-micro-batches 16,64,256 --out "$OUT/throughput_1b_prefill" ${BENCH_EXTRA:-}
want 350m_train && run_phase 350m_train 100 $BENCH throughput configs/model/350m.yaml "${TRAIN[@]}" \
    --micro-batches 16,32,48,56,64,72,80,88,96,128 --out "$OUT/throughput_350m" ${BENCH_EXTRA:-}
want 350m_prefill && run_phase 350m_prefill 40 $BENCH throughput configs/model/350m.yaml "${PREFILL[@]}" \
    --inference-micro-batches 16,64,256 --out "$OUT/throughput_350m_prefill" ${BENCH_EXTRA:-}
if want quality; then
    # cola first: the goal is elas vs cola; dense last (cut first when time runs out)
    cap=$(allow 400); per_run=$(( cap / 4 > 30 ? cap / 4 : 30 ))
    run_phase quality "$cap" $BENCH quality --sizes 60m --variants cola,elas,dense --elas-warmup 0,40 \
        --steps "${QUALITY_STEPS:-400}" --data data/pydocs/tokens/pydocs_text_document \
        -o train.global_batch=32 -o train.micro_batch=32 -o train.eval_every=50 -o train.eval_iters=8 \
        --timeout-s "$per_run" --out /tmp/perf_quality ${QUALITY_EXTRA:-}
    mkdir -p "$OUT/quality"
    cp /tmp/perf_quality/quality.* "$OUT/quality/" 2>/dev/null
    for d in /tmp/perf_quality/runs/*/; do
        n=$(basename "$d"); mkdir -p "$OUT/quality/runs/$n"
        cp "$d/metrics.jsonl" "$d/config.yaml" "$OUT/quality/runs/$n/" 2>/dev/null
    done
    cp -r /tmp/perf_quality/logs "$OUT/quality/" 2>/dev/null
fi
echo "== done in ${SECONDS} s"
