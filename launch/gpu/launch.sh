#!/usr/bin/env bash
# Starts one process of a multi-node JAX job: sets where the coordinator is, how many
# processes there are and which one this is (CLIP_JAX_COORDINATOR_ADDRESS,
# CLIP_JAX_NUM_PROCESSES, CLIP_JAX_PROCESS_ID, read by clip_jax/distributed.py for
# jax.distributed.initialize), then runs `python -m clip_jax.main ARGS...`.
# Run it once per node (or per GPU), each with its own process id; no torchrun needed.
#
#   launch/gpu/launch.sh --coordinator=node0:12345 --num-processes=2 --process-id=0 \
#     -- --config=configs/vit_b32.py --workdir=/shared/runs/vit_b32
#
# Each value comes from, in order: the flag; the environment variable
# CLIP_JAX_COORDINATOR_ADDRESS (HOST:PORT), CLIP_JAX_NUM_PROCESSES, CLIP_JAX_PROCESS_ID;
# or SLURM (inside srun: SLURM_NTASKS, SLURM_PROCID, the first host of
# SLURM_JOB_NODELIST, port CLIP_JAX_COORDINATOR_PORT or 10000 + SLURM_JOB_ID % 20000).
#
#   --local-device-ids=0,1   the GPUs this process drives (env JAX_LOCAL_DEVICE_IDS,
#                            which JAX reads; default: all it sees)
#   --python=PY              interpreter (env PYTHON, default python)
#   --dry-run                print the environment and the command instead of running
set -euo pipefail

coordinator="${CLIP_JAX_COORDINATOR_ADDRESS:-}"
num_processes="${CLIP_JAX_NUM_PROCESSES:-}"
process_id="${CLIP_JAX_PROCESS_ID:-}"
local_device_ids="${JAX_LOCAL_DEVICE_IDS:-}"
python="${PYTHON:-python}"
dry_run=0

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

# The first host of a SLURM node list such as `gpu-[003-010,012],login1` (scontrol
# expands it where available; the parser covers machines without it, e.g. tests).
first_host() {
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local first="${1%%,*}"
  if [[ "$1" == *\[* && "${first}" == *\[* ]]; then
    local prefix="${1%%\[*}" ranges="${1#*\[}"
    ranges="${ranges%%\]*}"
    first="${prefix}${ranges%%[-,]*}"
  fi
  echo "${first}"
}

while (($#)); do
  case "$1" in
    --coordinator=*) coordinator="${1#*=}" ;;
    --num-processes=*) num_processes="${1#*=}" ;;
    --process-id=*) process_id="${1#*=}" ;;
    --local-device-ids=*) local_device_ids="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h | --help)
      sed -n '2,/^set/{/^set/d;s/^# \{0,1\}//;p}' "$0"
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) die "unknown flag $1 (trainer flags go after --; see --help)" ;;
  esac
  shift
done

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  num_processes="${num_processes:-${SLURM_NTASKS:-${SLURM_NPROCS:-}}}"
  process_id="${process_id:-${SLURM_PROCID:-}}"
  if [[ -z "${coordinator}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    port="${CLIP_JAX_COORDINATOR_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
    coordinator="$(first_host "${SLURM_JOB_NODELIST}"):${port}"
  fi
fi

[[ -n "${coordinator}" ]] ||
  die 'no coordinator: pass --coordinator=HOST:PORT, set CLIP_JAX_COORDINATOR_ADDRESS, or run under srun'
[[ "${coordinator}" =~ ^[^:]+:[0-9]+$ || "${coordinator}" =~ ^\[.*\]:[0-9]+$ ]] ||
  die "--coordinator: expected HOST:PORT, got '${coordinator}'"
[[ "${num_processes}" =~ ^[1-9][0-9]*$ ]] ||
  die "--num-processes (CLIP_JAX_NUM_PROCESSES): expected a positive integer, got '${num_processes}'"
if ! [[ "${process_id}" =~ ^[0-9]+$ ]] || ((process_id >= num_processes)); then
  die "--process-id (CLIP_JAX_PROCESS_ID): expected 0..$((num_processes - 1)), got '${process_id}'"
fi
[[ -z "${local_device_ids}" || "${local_device_ids}" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--local-device-ids: expected a comma-separated list such as 0,1, got '${local_device_ids}'"

env_vars=(
  "CLIP_JAX_COORDINATOR_ADDRESS=${coordinator}"
  "CLIP_JAX_NUM_PROCESSES=${num_processes}"
  "CLIP_JAX_PROCESS_ID=${process_id}"
)
if [[ -n "${local_device_ids}" ]]; then
  env_vars+=("JAX_LOCAL_DEVICE_IDS=${local_device_ids}")
fi
command=("${python}" -m clip_jax.main "$@")

echo "launch.sh: process ${process_id} of ${num_processes}, coordinator ${coordinator}" >&2
if ((dry_run)); then
  printf '%s\n' "${env_vars[@]}"
  printf -v line '%q ' "${command[@]}"
  echo "${line% }"
  exit 0
fi
export "${env_vars[@]?}"
exec "${command[@]}"
