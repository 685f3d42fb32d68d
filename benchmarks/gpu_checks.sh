#!/usr/bin/env bash
# Everything checked on one lent GPU in a single call (the device tool runs this in the repo root; results go
# to $OUT, or runs/gpu_checks). Needs the wheels in .whl/ (megatron-core, psutil, DeepSpeed sdist and its deps for
# the GPU image's Python; benchmarks/gpu_env.sh installs them), since the GPU image has torch/triton but not those:
#   1. every GPU-marked test (kernels vs reference, bf16 training of all variants with MFU logging, compat no-op)
#   2. the demo config on CUDA (bf16, SDPA, fused ELAS kernels)
#   3. benchmarks/parallel_backends.py at 350M (megatron vs DeepSpeed ZeRO-1, with/without recompute)
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
install_wheels "$OUT/deepspeed_install.log"
device_info "$OUT/device.txt"

echo "== 1. GPU tests"
python3 -m pytest -q -m gpu tests/gpu tests/unit/compat -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
echo "== 2. demo on CUDA"
python3 -m elas_megatron.cli.train configs/demo.yaml train.run_dir=/tmp/demo_gpu log.every=50 2>&1 \
    | grep -v -i warn | tee "$OUT/demo_gpu.log" | tail -4
cp /tmp/demo_gpu/metrics.jsonl "$OUT/demo_gpu_metrics.jsonl" 2>/dev/null
echo "== 3. optimizer backends x recompute at 350M"
timeout "${BACKENDS_TIMEOUT_S:-300}" python3 benchmarks/parallel_backends.py --json "$OUT/parallel_backends.json" \
    --steps "${BACKENDS_STEPS:-12}" 2>&1 | grep -v -i warn | tee "$OUT/parallel_backends.log" | tail -20
