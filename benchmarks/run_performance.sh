#!/usr/bin/env bash
# Model-level measurements of dense / cola / elas on one lent H100 in a single call (<= 9 min): throughput at 1B
# and 350M (training steps and forward-only prefill, bf16, SDPA attention, fused ELAS kernels), a short quality
# run (60M on the shipped Python-docs corpus) and the optimizer backends x recompute table at 350M. Run by the
# device tool in the repo root; results go to $OUT (or runs/perf). Needs the wheels in .whl/ (megatron-core,
# psutil, ... for the GPU image's Python; benchmarks/gpu_env.sh installs them); carry .whl. Plots need
# matplotlib, which the GPU image lacks: afterwards, here,
#   elas-bench plot OUT/throughput_1b ; elas-bench plot OUT/throughput_350m ;
#   elas-bench quality --report-only --out OUT/quality ...   (see docs/performance.md)
# Every phase writes its results as it goes and has its own time cap, so a cut-off phase still leaves its rows.
#   PHASES="1b_train 1b_prefill 350m_train 350m_prefill quality backends" (default: all, in this order)
#   BUDGET_S=530 (the whole call), QUALITY_STEPS=1500, CAP_<PHASE> (each phase's cap), BACKENDS_ARGS (benchmarks/parallel_backends.py's arguments)
# Everything lands in $RES (default /tmp/perf); at the end it is packed into $OUT/perf_results.tgz, since the
# device tool brings back only a few files, two folders deep (unpack here: tar xzf perf_results.tgz).
#   CPU check of this script: SKIP_WHEELS=1 BENCH_EXTRA="--tiny --seq-lens 16 --micro-batches 1,2
#     --inference-micro-batches 1,2" QUALITY_EXTRA="--tiny" QUALITY_STEPS=4 bash benchmarks/run_performance.sh
set -uo pipefail
OUT=${OUT:-runs/perf}; mkdir -p "$OUT"
RES=${RES:-/tmp/perf}; mkdir -p "$RES"
BUDGET_S=${BUDGET_S:-530}
PHASES=${PHASES:-"1b_train 1b_prefill 350m_train 350m_prefill quality backends"}
source benchmarks/gpu_env.sh
install_wheels
device_info "$RES/device.txt"

BENCH="python3 -m elas_megatron.cli.bench"
# seconds a phase may take: its cap, or what is left of the budget (minus a margin to copy files)
allow() { local left=$(( BUDGET_S - SECONDS - 10 )); (( left < $1 )) && echo $(( left > 0 ? left : 1 )) || echo "$1"; }
run_phase() {  # name cap command...
    local name=$1 cap; cap=$(allow "$2"); shift 2
    echo "== $name (up to ${cap} s; ${SECONDS} s used)"
    # shellcheck disable=SC2086  # BENCH_EXTRA / QUALITY_EXTRA are word lists
    timeout -k 15 "$cap" "$@" > "$RES/$name.log" 2>&1
    echo "   exit $? after ${SECONDS} s"; grep -E "^\| (\*\*elas|dense \||cola \||elas \||[0-9a-z]+_(dense|cola|elas))" "$RES/$name.log" | head -12
}
# Grids: the memory estimate (training/memory.py, within 90 % of 79.6 GiB) puts the largest micro-batch of 1024
# tokens at 24 (1B dense and cola), 40 (1B elas), 60 / 56 / 76 (350M dense / cola / elas); steps of 4 (1B) and
# 8 (350M) around those resolve the max-batch ratio to ~15 %. Measured on an H100 (benchmarks/results/2026-11-h100):
# 24 / 24 / 36 at 1B and 56 / 56 / >= 72 at 350M. Prefill keeps no activations: large batches fit.
TRAIN=(--steps 3 --warmup 2 --profile-steps 1 --isolation variant --seq-lens 1024)
PREFILL=(--no-train --inference --steps 3 --warmup 1 --profile-steps 1 --isolation variant --seq-lens 1024)
want 1b_train && run_phase 1b_train "${CAP_1B_TRAIN:-240}" $BENCH throughput configs/model/1b.yaml "${TRAIN[@]}" \
    --micro-batches "${MB_1B:-8,16,24,28,32,40,44,48,56}" --out "$RES/throughput_1b" ${BENCH_EXTRA:-}
want 1b_prefill && run_phase 1b_prefill "${CAP_1B_PREFILL:-150}" $BENCH throughput configs/model/1b.yaml "${PREFILL[@]}" \
    --inference-micro-batches "${PF_MB:-64,256}" --out "$RES/throughput_1b_prefill" ${BENCH_EXTRA:-}
want 350m_train && run_phase 350m_train "${CAP_350M_TRAIN:-170}" $BENCH throughput configs/model/350m.yaml "${TRAIN[@]}" \
    --micro-batches "${MB_350M:-16,32,56,64,72,80,96,112,128}" --out "$RES/throughput_350m" ${BENCH_EXTRA:-}
want 350m_prefill && run_phase 350m_prefill "${CAP_350M_PREFILL:-100}" $BENCH throughput configs/model/350m.yaml "${PREFILL[@]}" \
    --inference-micro-batches "${PF_MB:-64,256}" --out "$RES/throughput_350m_prefill" ${BENCH_EXTRA:-}
if want quality; then
    # the four 60M runs at once (each leaves the GPU idle between launches; results do not depend on --jobs).
    # lr 1e-3 for all: the recipe's 6e-3 (60M low-rank) is for 512 x 256-token batches; with 16 x 256 it held
    # cola and elas back (docs/performance.md, "Quality")
    cap=$(allow "${CAP_QUALITY:-330}")
    run_phase quality "$cap" $BENCH quality --sizes 60m --variants cola,elas,dense --elas-warmup 0,150 \
        --steps "${QUALITY_STEPS:-1500}" --data data/pydocs/tokens/pydocs_text_document \
        -o train.global_batch=16 -o train.micro_batch=16 -o optim.lr=1e-3 -o train.eval_every=100 \
        -o train.eval_iters=16 --jobs 4 --timeout-s $(( cap - 15 )) --out /tmp/perf_quality ${QUALITY_EXTRA:-}
    mkdir -p "$RES/quality"
    cp /tmp/perf_quality/quality.* "$RES/quality/" 2>/dev/null
    for d in /tmp/perf_quality/runs/*/; do
        n=$(basename "$d"); mkdir -p "$RES/quality/runs/$n"
        cp "$d/metrics.jsonl" "$d/config.yaml" "$RES/quality/runs/$n/" 2>/dev/null
    done
    cp -r /tmp/perf_quality/logs "$RES/quality/" 2>/dev/null
fi
if want backends; then
    # optimizer backends x recompute at 350M (docs/parallelism.md); DeepSpeed from the carried sdist
    install_deepspeed "$RES/deepspeed_install.log"
    # shellcheck disable=SC2086  # BACKENDS_ARGS is a word list
    run_phase backends "${CAP_BACKENDS:-300}" python3 benchmarks/parallel_backends.py --json "$RES/parallel_backends.json" \
        ${BACKENDS_ARGS:-}
    grep -E "^\|" "$RES/backends.log" | tail -14
fi
tar czf "$OUT/perf_results.tgz" -C "$RES" . && echo "== packed $(du -h "$OUT/perf_results.tgz" | cut -f1) into perf_results.tgz"
echo "== done in ${SECONDS} s"
