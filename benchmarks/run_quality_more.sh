#!/usr/bin/env bash
# Issue 7, second quality call on one lent GPU (<= 9 min): what the 60M comparison of run_performance.sh's quality
# phase leaves open, as six runs side by side on the shipped Python-docs corpus, same budget (1500 steps x 16 x 256
# tokens, lr 1e-3 for all):
#   130m/  : cola, elas and dense at 130M (issue 7's "130M if time allows");
#   seed2/ : cola and elas at 60M with another seed (init and data order), to see run-to-run noise of the gap;
#   nosparse/ : elas at 60M with model.sparse24=false (squared-ReLU low-rank FFN computed dense), which splits
#            elas-vs-cola into "squared ReLU without gate" and "the 2:4 selection".
# Needs the wheels in .whl/ as run_performance.sh (carry .whl); results packed into $OUT/quality_more.tgz.
# Afterwards, here: elas-bench quality --report-only --out <dir> ... for each folder (see docs/performance.md).
set -uo pipefail
OUT=${OUT:-perf_out}; mkdir -p "$OUT"
RES=${RES:-/tmp/quality_more}; mkdir -p "$RES"
STEPS=${STEPS:-1500}; TIMEOUT_S=${TIMEOUT_S:-480}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if [[ -z "${SKIP_WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$RES/device.txt"
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
