#!/usr/bin/env bash
# Install elas-megatron into the current Python environment without ever replacing an existing torch.
#   bash scripts/install.sh        # the framework (+ megatron-core 0.16.1 on Python < 3.12)
#   bash scripts/install.sh dev    # + test tools (Triton for the kernel tests) and the optional DeepSpeed backend
# A cluster's CUDA build of torch is kept as it is. Only when no torch is importable does this install one:
# ${TORCH_SPEC:-torch==2.13.0} (the CPU build on the project's CI machines; set TORCH_SPEC for another build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

# torch is looked up, not imported: importing it before numpy is installed prints "Failed to initialize NumPy"
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" >/dev/null 2>&1; then
    echo "install.sh: no torch found; installing ${TORCH_SPEC:-torch==2.13.0}"
    $PIP "${TORCH_SPEC:-torch==2.13.0}"
fi
TORCH_VERSION=$($PY -c "import importlib.metadata as m; print(m.version('torch'))")
# Pin torch to what is installed so that no dependency can pull another build.
CONSTRAINTS=$(mktemp); trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

EXTRAS=""
[ "${1:-}" = "dev" ] && EXTRAS="[dev]"
$PIP -c "$CONSTRAINTS" -e ".${EXTRAS}"

if [ "${1:-}" = "dev" ]; then
    # DeepSpeed (optional backend): pure Python with ops JIT-built on first use. --no-deps keeps pip away from
    # torch; its pure-Python needs are listed explicitly.
    if ! $PY -c "import deepspeed" >/dev/null 2>&1; then
        DS_BUILD_OPS=0 $PIP -c "$CONSTRAINTS" --no-deps deepspeed==0.19.8 einops hjson msgpack ninja py-cpuinfo
        $PIP -c "$CONSTRAINTS" "pydantic>=2"
    fi
    # Build DeepSpeed's CPU shared-memory comm op once (g++, 20-50 s) so tests don't pay for it; non-fatal.
    if ! $PY -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        DS_ACCELERATOR=cpu $PY -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" \
            >/dev/null 2>&1 || echo "install.sh: note: DeepSpeed's CPU comm op did not pre-build; it builds on first use"
    fi
fi
echo "install.sh: elas-megatron installed (torch ${TORCH_VERSION})"
