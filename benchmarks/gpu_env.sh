# Sourced by the benchmarks/*.sh scripts that run on a lent GPU: environment, phase selection, the install of the
# carried wheels (.whl/: megatron-core and its deps for the GPU image's Python, the DeepSpeed sdist) and the
# device description. Each script sets OUT (what comes back; default under runs/, which git ignores) and PHASES
# (its default) before sourcing. SKIP_WHEELS=1: no install (e.g. a CPU check of a script).
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
# fewer fragmentation OOMs, so the largest batch that fits is the model's, not the allocator's
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
want() { [[ " $PHASES " == *" $1 "* ]]; }
# install_wheels [deepspeed_log]: the wheels into /tmp/site, and DeepSpeed too when a log path is given
install_wheels() {
    [[ -n "${SKIP_WHEELS:-}" ]] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    if [[ -n "${1:-}" ]]; then install_deepspeed "$1"; fi
}
# install_deepspeed LOG: DeepSpeed from the carried sdist (no ops built), its pip output in LOG
install_deepspeed() {
    [[ -n "${SKIP_WHEELS:-}" ]] && return 0
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
        .whl/deepspeed-*.tar.gz > "$1" 2>&1 || echo "deepspeed install failed (see $1)"
}
# device_info FILE: the GPU (name, memory, driver) and the library versions, into FILE and on stdout
device_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$1"
    python3 - <<'PY' | tee -a "$1"
import importlib
import torch
out = ["torch", torch.__version__]
for name, module in (("triton", "triton"), ("mcore", "megatron.core")):
    try:
        out += [name, importlib.import_module(module).__version__]
    except ImportError:
        pass
cs = getattr(torch.backends, "cusparselt", None)
if cs is not None and cs.is_available():
    out += ["cuSPARSELt", str(cs.version())]
print(*out)
PY
}
