#!/usr/bin/env bash
# Launch elas-megatron pretraining with torchrun, on one node or on each node of a multi-node job.
#
#   launch/torchrun.sh [LAUNCH OPTIONS] CONFIG.yaml [MORE.yaml ...] [section.key=value ...] [--resume]
#   launch/torchrun.sh [LAUNCH OPTIONS] CONFIG.yaml ... --dry-run [--no-data-check] [--vocab-size V]
#   launch/torchrun.sh --help
#
#   launch/torchrun.sh configs/demo.yaml                                   # one node, all visible GPUs (or 1 CPU process)
#   launch/torchrun.sh --nnodes 4 --node-rank 0 --rdzv-endpoint node01:29400 configs/c4.yaml ...   # on every node,
#                                                                          # with its own --node-rank
# Launch options (environment variable in brackets; SLURM's variables fill them inside an allocation):
#   --nproc-per-node N     [NPROC_PER_NODE]   processes on this node (default: visible GPUs, else 1)
#   --nnodes N             [NNODES]           nodes (default 1, or $SLURM_NNODES)
#   --node-rank R          [NODE_RANK]        this node's index 0..N-1 (default $SLURM_NODEID, else 0); node 0 prints
#                                             the report (c10d rendezvous assigns the process ranks itself)
#   --rdzv-endpoint H:P    [RDZV_ENDPOINT]    c10d rendezvous host:port, reachable from every node (default with one
#                                             node: a free local port; with several: $MASTER_ADDR:$MASTER_PORT)
#   --rdzv-id ID           [RDZV_ID]          run id shared by all nodes (default $SLURM_JOB_ID, else "elas")
#   --shutdown-timeout S   [ELAS_SHUTDOWN_TIMEOUT_S]  seconds workers get to save a checkpoint after SIGTERM/SIGUSR1
#                                             before torchrun kills them (default 600)
# Planning (nothing starts): --dry-run prints the report for world size nnodes x nproc-per-node and exits;
#   --no-data-check (with --dry-run) does not require the tokenizer and data files, --vocab-size V sets the
#   vocabulary when neither model.vocab_size nor the tokenizer gives it.
# All other arguments go to `python -m elas_megatron.cli.train`.
#
# Before torchrun starts, the config and layout are checked against the world size (nnodes x nproc-per-node) by
# the dry run, which node 0 also prints: layout, batch arithmetic, parameters and the per-GPU memory estimate.
# A bad config stops here with exit status 2, before any GPU is touched. `--dry-run` stops after that report.
# Environment defaults (each kept when already set): OMP_NUM_THREADS = CPU cores / processes per node,
# CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's TP/SP communication ordering), TORCH_NCCL_AVOID_RECORD_STREAMS=1,
# NCCL_DEBUG=WARN, PYTHONUNBUFFERED=1. torchrun forwards SIGTERM and SIGUSR1 to the workers, which save a
# checkpoint and exit (elas_megatron/training/signals.py); docs/launch.md has the details.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-elas}}
SHUTDOWN_TIMEOUT=${ELAS_SHUTDOWN_TIMEOUT_S:-600}
DRY_RUN=0
PLAN_ARGS=()
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc-per-node|--nproc_per_node) NPROC_PER_NODE=${2:?"$1 needs a value"}; shift 2 ;;
        --nproc-per-node=*|--nproc_per_node=*) NPROC_PER_NODE=${1#*=}; shift ;;
        --nnodes) NNODES=${2:?"$1 needs a value"}; shift 2 ;;
        --nnodes=*) NNODES=${1#*=}; shift ;;
        --node-rank|--node_rank) NODE_RANK=${2:?"$1 needs a value"}; shift 2 ;;
        --node-rank=*|--node_rank=*) NODE_RANK=${1#*=}; shift ;;
        --rdzv-endpoint|--rdzv_endpoint) RDZV_ENDPOINT=${2:?"$1 needs a value"}; shift 2 ;;
        --rdzv-endpoint=*|--rdzv_endpoint=*) RDZV_ENDPOINT=${1#*=}; shift ;;
        --rdzv-id|--rdzv_id) RDZV_ID=${2:?"$1 needs a value"}; shift 2 ;;
        --rdzv-id=*|--rdzv_id=*) RDZV_ID=${1#*=}; shift ;;
        --shutdown-timeout) SHUTDOWN_TIMEOUT=${2:?"$1 needs a value"}; shift 2 ;;
        --shutdown-timeout=*) SHUTDOWN_TIMEOUT=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-data-check) PLAN_ARGS+=("$1"); shift ;;
        --vocab-size) PLAN_ARGS+=("$1" "${2:?"$1 needs a value"}"); shift 2 ;;
        --vocab-size=*) PLAN_ARGS+=("$1"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done
[ ${#PLAN_ARGS[@]} -eq 0 ] || [ "$DRY_RUN" -eq 1 ] \
    || die "${PLAN_ARGS[0]} is for planning: add --dry-run (a run always checks its data)"
[ ${#TRAIN_ARGS[@]} -gt 0 ] || die "no config given; usage: launch/torchrun.sh [--nnodes N ...] CONFIG.yaml [section.key=value ...]"
for v in NNODES NODE_RANK SHUTDOWN_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v} is not a non-negative integer"
done
[ "$NNODES" -ge 1 ] || die "--nnodes must be >= 1"
[ "$NODE_RANK" -lt "$NNODES" ] || die "--node-rank $NODE_RANK is not below --nnodes $NNODES"

if [ -z "$NPROC_PER_NODE" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null) \
        || die "cannot import torch with $PYTHON; install the project (bash scripts/install.sh) or set PYTHON"
fi
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node $NPROC_PER_NODE is not a positive integer"
WORLD_SIZE=$(( NNODES * NPROC_PER_NODE ))

# ---- environment defaults (kept when set)
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
# torchrun (torch >= 2.8) forwards these signals to the workers and waits this long before SIGKILL; older
# torchrun versions ignore both variables (they forward SIGTERM with a 30 s grace).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export PET_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT

# ---- validate (every node) and print the layout (node 0) before any process group exists
CONFIG_ARGS=()
for a in "${TRAIN_ARGS[@]}"; do
    case "$a" in --*) ;; *) CONFIG_ARGS+=("$a") ;; esac
done
QUIET=()
[ "$NODE_RANK" -eq 0 ] || QUIET=(--quiet)
"$PYTHON" -m elas_megatron.cli.dryrun --world-size "$WORLD_SIZE" ${QUIET[@]+"${QUIET[@]}"} \
    ${PLAN_ARGS[@]+"${PLAN_ARGS[@]}"} "${CONFIG_ARGS[@]}" \
    || exit $?
[ "$DRY_RUN" -eq 0 ] || exit 0

# ---- rendezvous
RDZV=()
if [ -z "$RDZV_ENDPOINT" ]; then
    if [ "$NNODES" -gt 1 ]; then
        [ -n "${MASTER_ADDR:-}" ] || die "--nnodes $NNODES needs --rdzv-endpoint HOST:PORT (or MASTER_ADDR/MASTER_PORT)"
        RDZV_ENDPOINT="$MASTER_ADDR:${MASTER_PORT:-29400}"
    else
        RDZV=(--standalone)
    fi
fi
[ ${#RDZV[@]} -gt 0 ] || RDZV=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")

if command -v torchrun >/dev/null 2>&1; then TORCHRUN=(torchrun); else TORCHRUN=("$PYTHON" -m torch.distributed.run); fi
[ "$NODE_RANK" -ne 0 ] || echo "launch/torchrun.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es) per node," \
    "world size $WORLD_SIZE, rendezvous ${RDZV_ENDPOINT:-standalone}, OMP_NUM_THREADS=$OMP_NUM_THREADS"
# exec: torchrun replaces this shell, so signals sent to this task (srun, SLURM, kill) reach torchrun itself.
exec "${TORCHRUN[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    "${RDZV[@]}" --max-restarts 0 -m elas_megatron.cli.train "${TRAIN_ARGS[@]}"
