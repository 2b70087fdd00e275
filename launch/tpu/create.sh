#!/usr/bin/env bash
# Creates the TPU VM or pod slice and waits until it is ready.
#
#   launch/tpu/create.sh --zone=us-central2-b --accelerator-type=v4-32 [--spot] [--queued]
#
# --queued asks through a queued resource (the way to get large or spot slices: the
# request waits for capacity instead of failing); --spot makes the VMs preemptible at
# spot prices (watch.sh re-creates them after a preemption).
# WAIT_INTERVAL (seconds, default 30) paces the polling of a queued resource.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

create_tpu() {
  local flags
  mapfile -t flags < <(location_flags)
  local extra=()
  if [[ "${TPU_SPOT}" == 1 ]]; then
    extra+=(--spot)
  fi
  if [[ "${TPU_QUEUED}" == 1 ]]; then
    run "${GCLOUD}" compute tpus queued-resources create "${TPU_NAME}" "${flags[@]}" \
      "--node-id=${TPU_NAME}" "--accelerator-type=${TPU_ACCELERATOR_TYPE}" \
      "--runtime-version=${TPU_RUNTIME_VERSION}" "${extra[@]}"
    # The request returns at once; the slice exists when the queued resource is ACTIVE.
    local state=''
    while [[ "${DRY_RUN}" != 1 ]]; do
      state="$(tpu_state)"
      case "${state}" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) die "queued resource ${TPU_NAME} is ${state}; see: ${GCLOUD} compute tpus queued-resources describe ${TPU_NAME} --zone=${TPU_ZONE}" ;;
      esac
      echo "queued resource ${TPU_NAME}: ${state:-not visible yet}; waiting" >&2
      sleep "${WAIT_INTERVAL:-30}"
    done
  else
    run "${GCLOUD}" compute tpus tpu-vm create "${TPU_NAME}" "${flags[@]}" \
      "--accelerator-type=${TPU_ACCELERATOR_TYPE}" "--version=${TPU_RUNTIME_VERSION}" "${extra[@]}"
  fi
  echo "created ${TPU_ACCELERATOR_TYPE} '${TPU_NAME}' in ${TPU_ZONE} (runtime ${TPU_RUNTIME_VERSION})" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags '' "$@"
  create_tpu
fi
