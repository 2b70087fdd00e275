#!/usr/bin/env bash
# Copies the results out: every worker uploads its log to WORKDIR/logs/HOST.log, then
# the whole workdir (checkpoints, config.json, metrics, logs) is copied to DEST.
#
#   launch/tpu/copy_out.sh --zone=us-central2-b --name=my-tpu \
#     --workdir=gs://BUCKET/runs/vit_b32 --dest=./runs/vit_b32
#
# --dest (default ./clip_jax_runs) is a local directory; --logs-only skips the workdir.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COPY_DEST=./clip_jax_runs
COPY_WORKDIR=1

copy_flag() {
  case "$1" in
    --dest=*) COPY_DEST="${1#*=}" ;;
    --logs-only) COPY_WORKDIR=0 ;;
    *) return 1 ;;
  esac
}

copy_out() {
  require_workdir
  on_workers "bash ${REMOTE_REPO}/launch/tpu/worker.sh upload-log ${CLIP_JAX_WORKDIR%/}/logs"
  if [[ "${COPY_WORKDIR}" == 1 ]]; then
    run mkdir -p "${COPY_DEST}"
    run "${GCLOUD}" storage cp --recursive "${CLIP_JAX_WORKDIR%/}" "${COPY_DEST}"
    echo "copied ${CLIP_JAX_WORKDIR} to ${COPY_DEST}" >&2
  else
    echo "uploaded the logs of every worker to ${CLIP_JAX_WORKDIR%/}/logs" >&2
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags copy_flag "$@"
  copy_out
fi
