#!/usr/bin/env bash
# Deletes the TPU (and its queued resource with --queued). The workdir on gs:// stays.
#
#   launch/tpu/delete.sh --zone=us-central2-b --name=my-tpu [--queued]
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

delete_tpu() {
  local flags
  mapfile -t flags < <(location_flags)
  if [[ "${TPU_QUEUED}" == 1 ]]; then
    # --force deletes the node along with the request.
    run "${GCLOUD}" compute tpus queued-resources delete "${TPU_NAME}" "${flags[@]}" --force --quiet
  else
    run "${GCLOUD}" compute tpus tpu-vm delete "${TPU_NAME}" "${flags[@]}" --quiet
  fi
  echo "deleted '${TPU_NAME}' in ${TPU_ZONE}" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags '' "$@"
  delete_tpu
fi
