# Sourced by the benchmarks/run_*.sh scripts that run on a lent GPU: environment, phase selection and the
# install of the carried wheels (.whl/: megatron-core and its deps for the GPU image's Python, DeepSpeed sdist).
#   PHASES: the phases to run (each script sets its default before sourcing); SKIP_WHEELS=1: no install.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
want() { [[ " $PHASES " == *" $1 "* ]]; }
# install_wheels [deepspeed_log]: the wheels into /tmp/site, and DeepSpeed (no ops built) when a log path is given
install_wheels() {
    [[ -n "${SKIP_WHEELS:-}" ]] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    if [[ -n "${1:-}" ]]; then
        DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
            .whl/deepspeed-*.tar.gz > "$1" 2>&1 || echo "deepspeed install failed (see log)"
    fi
}
