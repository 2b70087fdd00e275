#!/usr/bin/env bash
# Keeps a training run alive until it finishes: creates the TPU if it is missing, sets
# it up and starts training, then polls. When the TPU is preempted (spot VMs, queued
# resources SUSPENDED) it deletes and re-creates it, sets it up again and restarts
# training, which resumes from the latest checkpoint in --workdir. When the job dies on
# any worker (a crash, or a worker that lost its peers) it restarts the job on all.
#
#   launch/tpu/watch.sh --zone=us-central2-b --accelerator-type=v4-32 --spot --queued \
#     --config=configs/vit_b32.py --workdir=gs://BUCKET/runs/vit_b32 \
#     --data='gs://BUCKET/laion/{00000..00999}.tar' [--delete-when-done]
#
# WATCH_INTERVAL (seconds, default 60) paces the polling; WATCH_MAX_RESTARTS (default
# 50) bounds re-creations plus job restarts. With --dry-run it prints one pass: the
# state query, the commands that bring up a missing TPU, and the job query.
# Run it under tmux/screen or nohup on a machine that stays up (e.g. a small GCE VM).
LAUNCH_DIR="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=create.sh
source "${LAUNCH_DIR}/create.sh"
# shellcheck source=setup.sh
source "${LAUNCH_DIR}/setup.sh"
# shellcheck source=train.sh
source "${LAUNCH_DIR}/train.sh"
# shellcheck source=delete.sh
source "${LAUNCH_DIR}/delete.sh"

DELETE_WHEN_DONE=0
WATCH_INTERVAL="${WATCH_INTERVAL:-60}"
WATCH_MAX_RESTARTS="${WATCH_MAX_RESTARTS:-50}"

watch_flag() {
  case "$1" in
    --delete-when-done) DELETE_WHEN_DONE=1 ;;
    *) return 1 ;;
  esac
}

log() {
  echo "watch $(date -u +%FT%TZ) ${TPU_NAME}: $*" >&2
}

# One word for the state of the job over all workers: running, done, failed or unknown.
job_state() {
  local lines
  lines="$(query "${GCLOUD}" compute tpus tpu-vm ssh "${TPU_NAME}" "${LOCATION[@]}" --worker=all \
    "--command=bash ${REMOTE_REPO}/launch/tpu/worker.sh status" | grep '^clip_jax_job ' || true)"
  if [[ -z "${lines}" ]]; then
    echo unknown
  elif grep -q -v -E ': (running|exit 0)$' <<<"${lines}"; then
    echo failed # a worker exited non-zero or has no job (e.g. it was restarted)
  elif grep -q ': running$' <<<"${lines}"; then
    echo running
  else
    echo 'done'
  fi
}

bring_up() {
  create_tpu
  setup_workers
  start_training
}

watch_loop() {
  local restarts=0 state job
  while true; do
    state="$(tpu_state)"
    case "${state}" in
      READY | ACTIVE)
        job="$(job_state)"
        log "TPU ${state}, job ${job}"
        case "${job}" in
          done)
            log 'training finished'
            if [[ "${DELETE_WHEN_DONE}" == 1 ]]; then
              delete_tpu
            fi
            return 0
            ;;
          failed)
            restarts=$((restarts + 1))
            log "restarting the job on every worker (restart ${restarts})"
            on_workers "bash ${REMOTE_REPO}/launch/tpu/worker.sh stop"
            start_training
            ;;
        esac
        ;;
      '' | PREEMPTED | TERMINATED | STOPPED | SUSPENDING | SUSPENDED | FAILED)
        if [[ -n "${state}" ]]; then
          restarts=$((restarts + 1))
          log "TPU ${state}: deleting and re-creating it (restart ${restarts})"
          delete_tpu
        else
          log 'no TPU: creating it'
        fi
        bring_up
        ;;
      *)
        log "TPU ${state}: waiting"
        ;;
    esac
    if [[ "${DRY_RUN}" == 1 ]]; then
      job_state >/dev/null
      log 'dry run: one pass shown'
      return 0
    fi
    if ((restarts > WATCH_MAX_RESTARTS)); then
      die "gave up after ${restarts} restarts (WATCH_MAX_RESTARTS=${WATCH_MAX_RESTARTS})"
    fi
    sleep "${WATCH_INTERVAL}"
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags watch_flag "$@"
  require_workdir
  mapfile -t LOCATION < <(location_flags)
  watch_loop
fi
