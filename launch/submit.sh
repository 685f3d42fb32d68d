#!/usr/bin/env bash
# Check a run with the dry run, then submit launch/slurm.sbatch.
#
#   launch/submit.sh [SBATCH OPTIONS] [--chain=N] [--dry-run] [--no-data-check] [--vocab-size=V] [--] CONFIG.yaml
#                    [MORE.yaml ...] [section.key=value ...]
#   launch/submit.sh --nodes=4 --time=48:00:00 --partition=gpu -- configs/c4.yaml configs/model/1b.yaml \
#       configs/variant/elas.yaml configs/layout/dp8.yaml train.micro_batch=16
#   launch/submit.sh --help
#
# Leading options (write them as --name=value) go to sbatch unchanged; --nodes (default 1) and --gpus-per-node
# (default 8; 0 for CPU nodes, one process each) also set the world size the dry run checks. The job name defaults
# to "elas-" + the YAML file names, the log to runs/slurm/<job name>-<job id>.out (that folder, or the one of
# --output / --error, is created here: SLURM does not create it and fails the job without a word).
# --chain=N submits N jobs that continue one run, each starting after the previous one ended (--dependency=afterany:
# JOB): for a run longer than a job's --time; every link but the last stops at its time limit without requeueing
# itself. ELAS_SUBMIT_DRY=1 prints the sbatch command(s) instead of running them.
# Planning flags (before or after the configs; not passed to sbatch): --dry-run prints the dry-run report for
# nodes x gpus-per-node processes and exits without submitting; --no-data-check skips the tokenizer and data file
# checks here (e.g. a login node that does not see the data; the job checks them again when it starts);
# --vocab-size=V sets the vocabulary when neither model.vocab_size nor the tokenizer gives it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

SBATCH_ARGS=()
NODES=1
GPUS=8
NAME=
DRY_RUN=0
CHAIN=1
DEPENDENCY=
PLAN_ARGS=()
LOG_DIRS=(runs/slurm)  # SLURM fails a job whose --output folder is missing (JobLaunchFailure, no log at all)
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-data-check) PLAN_ARGS+=("$1"); shift ;;
        --vocab-size=*) PLAN_ARGS+=("$1"); shift ;;
        --chain=*) CHAIN=${1#*=}; shift ;;
        --dependency=*) DEPENDENCY=${1#*=}; shift ;;  # the first link's; the chain adds its own
        --nodes=*|-N=*) NODES=${1#*=}; SBATCH_ARGS+=("--nodes=$NODES"); shift ;;
        --gpus-per-node=*) GPUS=${1#*=}; GPUS=${GPUS##*:}; SBATCH_ARGS+=("$1"); shift ;;
        --job-name=*|-J=*) NAME=${1#*=}; shift ;;
        --output=*|--error=*) LOG_DIRS+=("$(dirname "${1#*=}")"); SBATCH_ARGS+=("$1"); shift ;;
        --*=*) SBATCH_ARGS+=("$1"); shift ;;
        -*) echo "launch/submit.sh: write sbatch options as --name=value (got $1)" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { echo "launch/submit.sh: no config given" >&2; exit 2; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "launch/submit.sh: --nodes=$NODES must be a positive integer" >&2; exit 2; }
[[ $GPUS =~ ^[0-9]+$ ]] || {
    echo "launch/submit.sh: --gpus-per-node=$GPUS must be a non-negative integer (0: CPU nodes)" >&2; exit 2; }
[[ $CHAIN =~ ^[1-9][0-9]*$ ]] || { echo "launch/submit.sh: --chain=$CHAIN must be a positive integer" >&2; exit 2; }
PROCS_PER_NODE=$GPUS
[ "$GPUS" -gt 0 ] || PROCS_PER_NODE=1

CONFIG_ARGS=()
STEMS=()
JOB_ARGS=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY_RUN=1; continue ;;
        --no-data-check|--vocab-size=*) PLAN_ARGS+=("$a"); continue ;;
        -h|--help) usage; exit 0 ;;
    esac
    JOB_ARGS+=("$a")
    case "$a" in
        --*) ;;
        *=*) CONFIG_ARGS+=("$a") ;;
        *) CONFIG_ARGS+=("$a"); STEMS+=("$(basename "${a%.*}")") ;;
    esac
done
if [ -z "$NAME" ]; then
    NAME=$(IFS=-; echo "elas-${STEMS[*]}")
fi
"$PYTHON" -m elas_megatron.cli.dryrun --world-size $(( NODES * PROCS_PER_NODE )) ${PLAN_ARGS[@]+"${PLAN_ARGS[@]}"} \
    "${CONFIG_ARGS[@]}"
[ "$DRY_RUN" -eq 0 ] || exit 0

for d in "${LOG_DIRS[@]}"; do
    [[ $d == *%* ]] || mkdir -p "$d"  # a folder named by a pattern (%u, %x, ...) is left to the user
done
DEP=$DEPENDENCY
for ((link = 1; link <= CHAIN; link++)); do
    CMD=(sbatch --job-name="$NAME" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"})
    [ -z "$DEP" ] || CMD+=(--dependency="$DEP")
    [ "$CHAIN" -eq 1 ] || CMD+=(--export="ALL,ELAS_CHAIN=$link/$CHAIN" --parsable)
    CMD+=(launch/slurm.sbatch "${JOB_ARGS[@]}")
    if [ "${ELAS_SUBMIT_DRY:-0}" = 1 ]; then
        printf '%q ' "${CMD[@]}"; echo
        DEP="afterany:<job $link>"
    elif [ "$CHAIN" -eq 1 ]; then
        "${CMD[@]}"
    else
        JOB=$("${CMD[@]}") || exit $?
        JOB=${JOB%%;*}  # "id;cluster" on federated clusters
        echo "Submitted batch job $JOB (chain link $link/$CHAIN${DEP:+, after ${DEP#afterany:}})"
        DEP="afterany:$JOB"
    fi
done
