#!/usr/bin/env bash
# Sparse input gradient of the up-projection + the direct cuSPARSELt binding (issue 4) on one lent GPU (<= 9.5 min):
#   tests  -- tests/gpu/test_sparse24_kernels.py (bf16/fp32, then fp16 in its own process) and test_train_gpu.py
#   bench  -- benchmarks/bench_elas_ffn.py --only sparse_bwd,ffn (1B and 7B shapes, T = 32k and 64k)
#   train  -- 1B elas training throughput with the binding (default) and with torch._cslt_sparse_mm
#             (ELAS_CUSPARSELT_IMPL=torch), one right after the other
# Needs .whl/ (benchmarks/gpu_env.sh; carry it); everything is packed into $OUT/sparse_backward.tgz (default OUT:
# runs/sparse_backward). PHASES="tests bench train",
# SKIP_TRAIN_TESTS=1, BENCH_ONLY (default sparse_bwd,ffn), MB (default 36), CAP_* (seconds per phase).
set -uo pipefail
OUT=${OUT:-runs/sparse_backward}; mkdir -p "$OUT"
RES=${RES:-/tmp/sparse_backward}; mkdir -p "$RES"
PHASES=${PHASES:-"tests bench train"}
source benchmarks/gpu_env.sh
install_wheels
device_info "$RES/device.txt"
if want tests; then
    for sel in "not float16" "float16 and not bfloat16"; do
        echo "== kernel tests -k '$sel' (${SECONDS} s)"
        timeout -k 10 "${CAP_TESTS:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sparse24_kernels.py \
            -k "$sel" > "$RES/tests_kernels_${sel// /_}.log" 2>&1
        echo "   exit $? after ${SECONDS} s"; tail -3 "$RES/tests_kernels_${sel// /_}.log"
    done
    if [[ -z "${SKIP_TRAIN_TESTS:-}" ]]; then
        echo "== training tests (${SECONDS} s)"
        timeout -k 10 "${CAP_TRAIN_TESTS:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_train_gpu.py \
            > "$RES/tests_train.log" 2>&1
        echo "   exit $? after ${SECONDS} s"; tail -3 "$RES/tests_train.log"
    fi
fi
if want bench; then
    echo "== bench_elas_ffn --only ${BENCH_ONLY:-sparse_bwd,ffn} (${SECONDS} s)"
    timeout -k 10 "${CAP_BENCH:-200}" python3 benchmarks/bench_elas_ffn.py --only "${BENCH_ONLY:-sparse_bwd,ffn}" \
        --json "$RES/bench.json" > "$RES/bench.log" 2>&1
    echo "   exit $? after ${SECONDS} s"; grep -E "^\|" "$RES/bench.log" | head -80
fi
TRAIN=(--steps 3 --warmup 2 --profile-steps 1 --isolation variant --seq-lens 1024 --micro-batches "${MB:-36}"
       --variants elas)
for impl in lib torch; do
    want train || continue
    echo "== 1B elas train, cuSPARSELt via $impl (${SECONDS} s)"
    ELAS_CUSPARSELT_IMPL=$impl timeout -k 10 "${CAP_PHASE:-120}" python3 -m elas_megatron.cli.bench throughput \
        configs/model/1b.yaml "${TRAIN[@]}" --out "$RES/train_1b_$impl" > "$RES/train_1b_$impl.log" 2>&1
    echo "   exit $? after ${SECONDS} s"
    grep -E "^\| (dense|cola|elas|\*\*elas)" "$RES/train_1b_$impl.log" | head -10
done
tar czf "$OUT/sparse_backward.tgz" -C "$RES" . && echo "== packed $(du -h "$OUT/sparse_backward.tgz" | cut -f1)"
echo "== done in ${SECONDS} s"
