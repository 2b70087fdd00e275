#!/usr/bin/env bash
# Streams the training log of one worker (default 0, the one that logs metrics), or of
# all workers at once with --worker=all. Ctrl-C stops streaming, not training.
#
#   launch/tpu/logs.sh --zone=us-central2-b --name=my-tpu [--worker=all] [--status]
#
# --status prints each worker's job state (running / exit N / absent) instead.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LOG_WORKER=0
LOG_ACTION=log

logs_flag() {
  case "$1" in
    --worker=*) LOG_WORKER="${1#*=}" ;;
    --status) LOG_ACTION=status ;;
    *) return 1 ;;
  esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags logs_flag "$@"
  if [[ "${LOG_ACTION}" == status ]]; then
    LOG_WORKER=all
  fi
  on_workers "bash ${REMOTE_REPO}/launch/tpu/worker.sh ${LOG_ACTION}" "${LOG_WORKER}"
fi
