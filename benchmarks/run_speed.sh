#!/usr/bin/env bash
# Whole-model speed of dense / cola / elas on one lent GPU, with the speed switches on (the defaults) and off (the
# plain paths), all variants side by side per phase; the tables of docs/performance.md ("Speed on one H200") are
# rendered from what this writes by `python3 benchmarks/speed_report.py RES_DIR`. Run by the device tool in the
# repo root with .whl/ carried (megatron-core and liger-kernel wheels for the GPU image's Python).
#   PHASES (default: "tests 1b 1b_plain 1b_switches"; the others: "prefill 7b"), OUT (default runs/speed: what
#   comes back, packed as speed_results.tgz), RES (default /tmp/speed), MB_1B, MB_1B_PLAIN, MB_7B, PF_MB.
#   CPU check of this script: SKIP_WHEELS=1 BENCH_EXTRA="--tiny --seq-lens 16" MB_1B=1,2 MB_1B_PLAIN=1 MB_7B=1 \
#     PF_MB=2 SKIP_TESTS=1 PHASES="1b 1b_plain 1b_switches prefill 7b" bash benchmarks/run_speed.sh
set -uo pipefail
OUT=${OUT:-runs/speed}; mkdir -p "$OUT"
RES=${RES:-/tmp/speed}; mkdir -p "$RES"
PHASES=${PHASES:-"tests 1b 1b_plain 1b_switches"}
source benchmarks/gpu_env.sh
install_wheels
device_info "$RES/device.txt"
# the device tool copies the working tree onto a checkout of an older commit: pass COMMIT=$(git rev-parse HEAD)
echo "${COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" > "$RES/commit.txt"

BENCH="python3 -m elas_megatron.cli.bench"
# the switches' plain twins: megatron's multi-tensor fallbacks, the fused q|k|v and gate|up layouts, megatron's
# output layer + vocab-parallel cross-entropy
PLAIN=(optim.multi_tensor_impl=megatron model.lowrank_parts=fused model.loss_backend=megatron)
TRAIN=(--steps 3 --warmup 2 --profile-steps 1 --isolation variant --seq-lens 1024)
PREFILL=(--no-train --inference --steps 3 --warmup 1 --profile-steps 1 --isolation variant --seq-lens 1024)
phase() {  # name command...: the command's output in RES/name.log, its report's table rows on stdout
    local name=$1; shift
    echo "== $name (${SECONDS} s used)"
    # shellcheck disable=SC2086  # BENCH_EXTRA is a word list
    "$@" > "$RES/$name.log" 2>&1
    echo "   exit $? after ${SECONDS} s"; grep -E "^\| *(dense|cola|elas|[0-9a-z_+-]+ \| (dense|cola|elas))" "$RES/$name.log" | head -16
    pack  # after every phase: a call cut off by its time limit still brings back the phases it finished
}
pack() {  # results.json of every phase (small) and the logs: the device tool brings back few files
    tar czf "$OUT/speed_results.tgz" -C "$RES" --exclude='runs' .
}
if want tests && [[ -z "${SKIP_TESTS:-}" ]]; then
    phase gpu_tests timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:warnings tests/gpu
    tail -3 "$RES/gpu_tests.log"
fi
# 1B: every variant up to the largest micro-batch that fits, defaults on, then the plain paths
want 1b && phase throughput_1b $BENCH throughput configs/model/1b.yaml "${TRAIN[@]}" \
    --micro-batches "${MB_1B:-40,64,96,128}" --label 1b --out "$RES/throughput_1b" ${BENCH_EXTRA:-}
want 1b_plain && phase throughput_1b_plain $BENCH throughput configs/model/1b.yaml "${PLAIN[@]}" "${TRAIN[@]}" \
    --micro-batches "${MB_1B_PLAIN:-40,64}" --label 1b-plain --out "$RES/throughput_1b_plain" ${BENCH_EXTRA:-}
# one switch at a time, cumulatively (plain -> + foreach -> + separate parts -> + liger loss = the defaults)
if want 1b_switches; then
    phase switch_foreach $BENCH throughput configs/model/1b.yaml model.lowrank_parts=fused model.loss_backend=megatron \
        "${TRAIN[@]}" --variants cola,elas --micro-batches "${MB_SWITCH:-64}" --label 1b+foreach \
        --out "$RES/throughput_1b_foreach" ${BENCH_EXTRA:-}
    phase switch_parts $BENCH throughput configs/model/1b.yaml model.loss_backend=megatron "${TRAIN[@]}" \
        --variants cola,elas --micro-batches "${MB_SWITCH:-64}" --label 1b+foreach+parts \
        --out "$RES/throughput_1b_parts" ${BENCH_EXTRA:-}
fi
if want prefill; then
    phase prefill_1b $BENCH throughput configs/model/1b.yaml "${PREFILL[@]}" --inference-micro-batches "${PF_MB:-256}" \
        --label 1b --out "$RES/prefill_1b" ${BENCH_EXTRA:-}
    phase prefill_1b_plain $BENCH throughput configs/model/1b.yaml "${PLAIN[@]}" "${PREFILL[@]}" \
        --inference-micro-batches "${PF_MB:-256}" --label 1b-plain --out "$RES/prefill_1b_plain" ${BENCH_EXTRA:-}
fi
want 7b && phase throughput_7b $BENCH throughput configs/model/7b.yaml "${TRAIN[@]}" --variants cola,elas \
    --micro-batches "${MB_7B:-8,12,16}" --label 7b --out "$RES/throughput_7b" ${BENCH_EXTRA:-}
pack && echo "== packed $(du -h "$OUT/speed_results.tgz" | cut -f1)"
echo "== done in ${SECONDS} s"
