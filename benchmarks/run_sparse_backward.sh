#!/usr/bin/env bash
# The sparse input gradient of the up-projection and the direct cuSPARSELt binding on one lent GPU (<= 9.5 min):
#   tests  -- tests/gpu/test_sparse24_kernels.py (bf16/fp32, then fp16 in its own process) and test_train_gpu.py
#   bench  -- elas-bench ffn at the 1B and 7B FFN shapes of docs/kernels.md (d 2048 / 4096, d_ff 5632 / 11008,
#             r 512 / 1024), T = 32k and 64k: every elas form side by side (backends, B_up outside the op, grad_h
#             on cuBLAS, torch._cslt_sparse_mm instead of the binding) and the pieces in BENCH_PIECES
#   train  -- 1B elas training throughput with the binding (default) and with torch._cslt_sparse_mm
#             (ELAS_CUSPARSELT_IMPL=torch), one right after the other
# Needs .whl/ (benchmarks/gpu_env.sh; carry it); everything is packed into $OUT/sparse_backward.tgz (default OUT:
# runs/sparse_backward). PHASES="tests bench train", SKIP_TRAIN_TESTS=1, BENCH_PIECES (default sparse_bwd; empty:
# the FFN table only), MB (default 36), CAP_* (seconds per phase).
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
    pieces=${BENCH_PIECES-sparse_bwd}
    echo "== elas-bench ffn, pieces: ${pieces:-none} (${SECONDS} s)"
    timeout -k 10 "${CAP_BENCH:-200}" python3 -m elas_megatron.cli.bench ffn --sizes 2048x5632x512,4096x11008x1024 \
        --tokens 32768,65536 --reps 20 --warmup 5 --compare reference,triton,cusparselt,outside,dense-grad-h,torch-cslt \
        ${pieces:+--pieces "$pieces"} --out "$RES/bench" > "$RES/bench.log" 2>&1
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
