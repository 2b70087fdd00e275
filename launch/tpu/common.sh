# shellcheck shell=bash
# Shared by the launch/tpu/*.sh scripts (sourced, never run): settings, flag parsing,
# and `run`, which prints every gcloud command and runs it unless --dry-run was given.
#
# Every setting comes from an environment variable and can be overridden by a flag:
#
#   flag                   environment variable     default
#   --name=NAME            TPU_NAME                 clip-jax
#   --project=PROJECT      TPU_PROJECT              gcloud's configured project
#   --zone=ZONE            TPU_ZONE                 (required)
#   --accelerator-type=T   TPU_ACCELERATOR_TYPE     v4-8
#   --runtime-version=V    TPU_RUNTIME_VERSION      chosen from the accelerator type
#   --spot                 TPU_SPOT=1               off (on-demand)
#   --queued               TPU_QUEUED=1             off (direct `tpu-vm create`)
#   --config=FILE          CLIP_JAX_CONFIG          configs/vit_b32.py
#   --workdir=gs://...     CLIP_JAX_WORKDIR         (required by train/watch/copy_out)
#   --data=gs://...        CLIP_JAX_DATA            training shards (config.data.train.pattern):
#                                                   globs, {000..099} ranges; .tar = img2dataset
#   --env=KEY=VALUE                                 environment of the training job
#                                                   (repeatable), e.g. JAX_COMPILATION_CACHE_DIR
#   --dry-run              DRY_RUN=1                off
#   -- ARGS...                                      passed on to python -m clip_jax.main
#
# GCLOUD names the gcloud binary (tests point it at a fake one).

set -euo pipefail

LAUNCH_TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_DIR="$(cd "${LAUNCH_TPU_DIR}/../.." && pwd)"

TPU_NAME="${TPU_NAME:-clip-jax}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_QUEUED="${TPU_QUEUED:-0}"
CLIP_JAX_CONFIG="${CLIP_JAX_CONFIG:-configs/vit_b32.py}"
CLIP_JAX_WORKDIR="${CLIP_JAX_WORKDIR:-}"
CLIP_JAX_DATA="${CLIP_JAX_DATA:-}"
DRY_RUN="${DRY_RUN:-0}"
GCLOUD="${GCLOUD:-gcloud}"
# Where the code and virtual environment live on every worker; the remote shell
# expands the ~ (SC2088), the scripts that source this file use them (SC2034).
# shellcheck disable=SC2088
REMOTE_REPO='~/clip_jax'
# shellcheck disable=SC2088,SC2034
REMOTE_VENV='~/clip_jax_venv'
TRAIN_ARGS=()
TRAIN_ENV=()

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints the script's header comment (its usage) and the shared settings.
usage() {
  sed -n '2,/^[^#]/{/^#/!d;/shellcheck/d;s/^# \{0,1\}//;p}' "$0"
  echo
  sed -n '/^# Every setting/,/^# GCLOUD/{s/^# \{0,1\}//;p}' "${LAUNCH_TPU_DIR}/common.sh"
}

# Parses the shared flags into the settings above; the script's own flags are
# handled by the optional callback `$1` (called with the flag, returns 1 if unknown).
parse_flags() {
  local own="$1"
  shift
  while (($#)); do
    local flag="$1" value=''
    if [[ "${flag}" == --*=* ]]; then
      value="${flag#*=}"
      flag="${flag%%=*}"
    fi
    case "${flag}" in
      --name | --project | --zone | --accelerator-type | --runtime-version | --config | --workdir | --data)
        if [[ "$1" != *=* ]]; then
          (($# >= 2)) || die "${flag} needs a value"
          value="$2"
          shift
        fi
        case "${flag}" in
          --name) TPU_NAME="${value}" ;;
          --project) TPU_PROJECT="${value}" ;;
          --zone) TPU_ZONE="${value}" ;;
          --accelerator-type) TPU_ACCELERATOR_TYPE="${value}" ;;
          --runtime-version) TPU_RUNTIME_VERSION="${value}" ;;
          --config) CLIP_JAX_CONFIG="${value}" ;;
          --workdir) CLIP_JAX_WORKDIR="${value}" ;;
          --data) CLIP_JAX_DATA="${value}" ;;
        esac
        ;;
      --env)
        if [[ "$1" != *=* ]]; then
          (($# >= 2)) || die '--env needs KEY=VALUE'
          value="$2"
          shift
        fi
        [[ "${value}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '${value}'"
        TRAIN_ENV+=("${value}")
        ;;
      --spot) TPU_SPOT=1 ;;
      --queued) TPU_QUEUED=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        TRAIN_ARGS+=("$@")
        break
        ;;
      *)
        if [[ -z "${own}" ]] || ! "${own}" "$1"; then
          die "unknown flag $1 (see $0 --help)"
        fi
        ;;
    esac
    shift
  done
  [[ -n "${TPU_ZONE}" ]] || die 'no zone: set TPU_ZONE or pass --zone=ZONE (e.g. us-central2-b)'
  [[ "${TPU_SPOT}" == 0 || "${TPU_SPOT}" == 1 ]] || die "TPU_SPOT must be 0 or 1, got '${TPU_SPOT}'"
  [[ "${TPU_QUEUED}" == 0 || "${TPU_QUEUED}" == 1 ]] || die "TPU_QUEUED must be 0 or 1, got '${TPU_QUEUED}'"
  if [[ -z "${TPU_RUNTIME_VERSION}" ]]; then
    TPU_RUNTIME_VERSION="$(default_runtime_version "${TPU_ACCELERATOR_TYPE}")"
  fi
}

# The TPU VM base image for each generation (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo 'tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) echo 'v2-alpha-tpuv5-lite' ;;
    v5p-*) echo 'v2-alpha-tpuv5' ;;
    v6e-*) echo 'v2-alpha-tpuv6e' ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

require_workdir() {
  [[ -n "${CLIP_JAX_WORKDIR}" ]] || die 'no workdir: set CLIP_JAX_WORKDIR or pass --workdir=gs://BUCKET/DIR'
  [[ "${CLIP_JAX_WORKDIR}" == gs://* ]] ||
    die "--workdir must be on gs:// so every worker and a restarted slice see the same checkpoints, got '${CLIP_JAX_WORKDIR}'"
}

# Prints a command (to stderr, as a shell could re-run it), then runs it unless --dry-run.
run() {
  trace "$@"
  if [[ "${DRY_RUN}" == 1 ]]; then
    return 0
  fi
  "$@"
}

# As `run`, for commands whose output is read: their errors are dropped and a
# failure gives empty output (a missing TPU has no state).
query() {
  trace "$@"
  if [[ "${DRY_RUN}" == 1 ]]; then
    return 0
  fi
  "$@" 2>/dev/null || true
}

trace() {
  echo "+ $(shell_quote "$@")" >&2
}

# Joins the arguments into one line a POSIX shell splits back into the same words:
# plain words stay as they are, the others go in single quotes.
shell_quote() {
  local arg words=()
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("${arg}")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Flags every `gcloud compute tpus` command takes.
location_flags() {
  echo "--zone=${TPU_ZONE}"
  if [[ -n "${TPU_PROJECT}" ]]; then
    echo "--project=${TPU_PROJECT}"
  fi
}

# Runs a shell command on every worker of the slice (or on worker `$2`).
on_workers() {
  local command="$1" worker="${2:-all}"
  local flags
  mapfile -t flags < <(location_flags)
  run "${GCLOUD}" compute tpus tpu-vm ssh "${TPU_NAME}" "${flags[@]}" "--worker=${worker}" \
    "--command=${command}"
}

# The one training command every worker runs: python -m clip_jax.main with the same
# flags everywhere (worker.sh adds each worker's process id and coordinator).
train_command() {
  local args=("--config=${CLIP_JAX_CONFIG}" "--workdir=${CLIP_JAX_WORKDIR}")
  if [[ -n "${CLIP_JAX_DATA}" ]]; then
    # img2dataset's webdataset shards are .tar files; anything else is read as TFRecord
    # unless the trainer flags after -- say otherwise (the last --config.x wins).
    if [[ "${CLIP_JAX_DATA}" == *.tar ]]; then
      args+=(--config.data.train.source=wds)
    fi
    args+=("--config.data.train.pattern=${CLIP_JAX_DATA}")
  fi
  args+=("${TRAIN_ARGS[@]}")
  local prefix=''
  if ((${#TRAIN_ENV[@]})); then
    prefix="env $(shell_quote "${TRAIN_ENV[@]}") "
  fi
  echo "${prefix}bash ${REMOTE_REPO}/launch/tpu/worker.sh start -- $(shell_quote "${args[@]}")"
}

# State of the TPU: the queued resource's (ACTIVE, SUSPENDED, ...) with --queued, else
# the node's (READY, PREEMPTED, ...); empty when it does not exist.
tpu_state() {
  local flags
  mapfile -t flags < <(location_flags)
  if [[ "${TPU_QUEUED}" == 1 ]]; then
    query "${GCLOUD}" compute tpus queued-resources describe "${TPU_NAME}" "${flags[@]}" \
      '--format=value(state.state)'
  else
    query "${GCLOUD}" compute tpus tpu-vm describe "${TPU_NAME}" "${flags[@]}" \
      '--format=value(state)'
  fi
}
