#!/usr/bin/env bash
# More quality runs on one lent GPU (<= 9 min), next to the 60M comparison of run_performance.sh's quality phase:
# six runs side by side on the shipped Python-docs corpus, same budget (1500 steps x 16 x 256 tokens, lr 1e-3 for
# all):
#   130m/  : cola, elas and dense at 130M;
#   seed2/ : cola and elas at 60M with another seed (init and data order), to see run-to-run noise of the gap;
#   nosparse/ : elas at 60M with model.sparse24=false (squared-ReLU low-rank FFN computed dense), which splits
#            elas-vs-cola into "squared ReLU without gate" and "the 2:4 selection".
# Needs the wheels in .whl/ (benchmarks/gpu_env.sh; carry .whl); results packed into $OUT/quality_more.tgz (default
# OUT: runs/quality_more).
# Afterwards, here: elas-bench quality --report-only --out <dir> ... for each folder (see docs/performance.md).
set -uo pipefail
OUT=${OUT:-runs/quality_more}; mkdir -p "$OUT"
RES=${RES:-/tmp/quality_more}; mkdir -p "$RES"
STEPS=${STEPS:-1500}; TIMEOUT_S=${TIMEOUT_S:-480}
source benchmarks/gpu_env.sh
install_wheels
device_info "$RES/device.txt"
Q=(python3 -m elas_megatron.cli.bench quality --steps "$STEPS" --data data/pydocs/tokens/pydocs_text_document
   -o train.global_batch=16 -o train.micro_batch=16 -o optim.lr=1e-3 -o train.eval_every=100 -o train.eval_iters=16
   --timeout-s "$TIMEOUT_S")
# shellcheck disable=SC2206  # QUALITY_EXTRA is a word list (CPU check: QUALITY_EXTRA=--tiny STEPS=4 SKIP_WHEELS=1)
Q+=(${QUALITY_EXTRA:-})
"${Q[@]}" --sizes "${SIZES_130:-130m}" --variants cola,elas,dense --jobs 3 --out "$RES/130m" > "$RES/130m.log" 2>&1 &
"${Q[@]}" --sizes 60m --variants cola,elas -o train.seed=2 --jobs 2 --out "$RES/seed2" > "$RES/seed2.log" 2>&1 &
"${Q[@]}" --sizes 60m --variants elas -o model.sparse24=false --jobs 1 --out "$RES/nosparse" > "$RES/nosparse.log" 2>&1 &
wait
for name in 130m seed2 nosparse; do
    echo "== $name"; grep -E "^\| [0-9]+m_" "$RES/$name.log"
done
tar czf "$OUT/quality_more.tgz" --exclude=data_cache -C "$RES" .  # quality runs save no checkpoints && echo "== packed $(du -h "$OUT/quality_more.tgz" | cut -f1)"
echo "== done in ${SECONDS} s"
