#!/usr/bin/env bash
# Fused RoPE + fused AdamW on one lent GPU (<= 9.5 min): their GPU tests, then the 1B training throughput of
# dense / cola / elas with megatron's unfused RoPE + torch's foreach AdamW ("before") and with the defaults
# (model.rope_backend=auto -> triton, optim.adam_impl=auto -> fused: "after"), one right after the other on the
# same machine. Needs .whl/ (benchmarks/gpu_env.sh; carry .whl); everything is packed into $OUT/fusion_ab.tgz
# (default OUT: runs/fusion_ab).
#   MB (default 24,28,36,40: the largest that fit before were 24 / 24 / 36), VARIANTS (default dense,cola,elas),
#   PHASES="tests before after", TESTS (default tests/gpu/test_rope_gpu.py)
set -uo pipefail
OUT=${OUT:-runs/fusion_ab}; mkdir -p "$OUT"
RES=${RES:-/tmp/fusion_ab}; mkdir -p "$RES"
PHASES=${PHASES:-"tests before after"}
source benchmarks/gpu_env.sh
install_wheels "$RES/deepspeed_install.log"
device_info "$RES/device.txt"
if want tests; then
    echo "== GPU tests (${SECONDS} s)"
    timeout -k 10 "${CAP_TESTS:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu/test_rope_gpu.py} \
        > "$RES/tests.log" 2>&1
    echo "   exit $? after ${SECONDS} s"; tail -3 "$RES/tests.log"
fi
TRAIN=(--steps 3 --warmup 2 --profile-steps 1 --isolation variant --seq-lens 1024 --micro-batches "${MB:-24,28,36,40}"
       --variants "${VARIANTS:-dense,cola,elas}")
for phase in before after; do
    want "$phase" || continue
    extra=(); [[ $phase == before ]] && extra=(model.rope_backend=megatron optim.adam_impl=foreach)
    echo "== 1B train, $phase (${SECONDS} s)"
    timeout -k 10 "${CAP_PHASE:-170}" python3 -m elas_megatron.cli.bench throughput configs/model/1b.yaml "${extra[@]}" \
        "${TRAIN[@]}" --out "$RES/train_1b_$phase" > "$RES/train_1b_$phase.log" 2>&1
    echo "   exit $? after ${SECONDS} s"
    grep -E "^\| (dense|cola|elas|\*\*elas)" "$RES/train_1b_$phase.log" | head -20
done
tar czf "$OUT/fusion_ab.tgz" -C "$RES" . && echo "== packed $(du -h "$OUT/fusion_ab.tgz" | cut -f1)"
echo "== done in ${SECONDS} s"
