#!/usr/bin/env bash
# Starts training on every worker with one and the same command (JAX finds each
# worker's process id and the coordinator from the TPU metadata), detached from ssh.
#
#   launch/tpu/train.sh --zone=us-central2-b --name=my-tpu --config=configs/vit_b32.py \
#     --workdir=gs://BUCKET/runs/vit_b32 --data='gs://BUCKET/laion/{00000..00999}.tar' \
#     -- --config.batch_size=32768
#
# A job already running is stopped first. The trainer resumes from the latest
# checkpoint in --workdir, so starting again after a crash or preemption continues.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

start_training() {
  require_workdir
  on_workers "$(train_command)"
  echo "started training on every worker of '${TPU_NAME}'; logs: launch/tpu/logs.sh, checkpoints: ${CLIP_JAX_WORKDIR}" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags '' "$@"
  start_training
fi
