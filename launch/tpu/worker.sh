#!/usr/bin/env bash
# Runs ON each TPU worker (train.sh, watch.sh, logs.sh and copy_out.sh call it over ssh).
# Keeps one training job per worker, detached from the ssh session so that a dropped
# connection does not stop training, with its log, pid and exit code in ~/clip_jax_job/.
#
#   worker.sh start -- ARGS...   start `python -m clip_jax.main ARGS...` in the background
#   worker.sh status             print `clip_jax_job HOST: running|exit N|absent`
#   worker.sh stop               stop the job (SIGTERM to its process group: the trainer
#                                saves a checkpoint) and wait for it; status: exit 143
#   worker.sh log                follow the job's log
#   worker.sh upload-log GS_DIR  copy the log to GS_DIR/HOST.log
#
# CLIP_JAX_VENV (default ~/clip_jax_venv) is the environment setup.sh built.
# The job gets the distributed environment clip_jax/distributed.py reads
# (CLIP_JAX_COORDINATOR_ADDRESS, CLIP_JAX_NUM_PROCESSES, CLIP_JAX_PROCESS_ID) from the
# TPU VM metadata, as JAX's own TPU cluster detection does: worker 0 coordinates, on
# CLIP_JAX_COORDINATOR_PORT (default 8476, JAX's).
set -euo pipefail

JOB_DIR="${CLIP_JAX_JOB_DIR:-${HOME}/clip_jax_job}"
VENV="${CLIP_JAX_VENV:-${HOME}/clip_jax_venv}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HOST="$(hostname)"
METADATA_URL="${TPU_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"

tpu_metadata() {
  curl -sf --max-time 10 -H 'Metadata-Flavor: Google' "${METADATA_URL}/$1"
}

# Exports the coordinator, process count and id of this worker unless they are set.
# `worker-network-endpoints` lists the workers in process order, either as hostnames
# or as name:id:ip triples.
export_distributed_env() {
  if [[ -n "${CLIP_JAX_COORDINATOR_ADDRESS:-}" ]]; then
    return 0
  fi
  local worker_id endpoints hosts=() endpoint
  worker_id="$(tpu_metadata agent-worker-number)" || return 0
  endpoints="$(tpu_metadata worker-network-endpoints)" || return 0
  IFS=',' read -r -a endpoints <<<"${endpoints}"
  for endpoint in "${endpoints[@]}"; do
    hosts+=("${endpoint##*:}")
  done
  export CLIP_JAX_COORDINATOR_ADDRESS="${hosts[0]}:${CLIP_JAX_COORDINATOR_PORT:-8476}"
  export CLIP_JAX_NUM_PROCESSES="${#hosts[@]}"
  export CLIP_JAX_PROCESS_ID="${worker_id}"
}

job_pid() {
  if [[ -f "${JOB_DIR}/pid" ]]; then
    local pid
    pid="$(<"${JOB_DIR}/pid")"
    if kill -0 "${pid}" 2>/dev/null; then
      echo "${pid}"
    fi
  fi
}

stop_job() {
  local pid
  pid="$(job_pid)"
  if [[ -z "${pid}" ]]; then
    return 0
  fi
  # The job leads its own process group (setsid): stop python and its children together.
  kill -TERM -- "-${pid}" 2>/dev/null || true
  for _ in $(seq 60); do
    kill -0 "${pid}" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL -- "-${pid}" 2>/dev/null || true
}

case "${1:-}" in
  start)
    shift
    [[ "${1:-}" == -- ]] && shift
    stop_job
    mkdir -p "${JOB_DIR}"
    rm -f "${JOB_DIR}/exit"
    setsid nohup bash "${BASH_SOURCE[0]}" run -- "$@" >"${JOB_DIR}/log" 2>&1 </dev/null &
    echo $! >"${JOB_DIR}/pid"
    echo "clip_jax_job ${HOST}: started pid $!, log ${JOB_DIR}/log"
    ;;
  run)
    shift
    [[ "${1:-}" == -- ]] && shift
    # shellcheck source=/dev/null
    source "${VENV}/bin/activate"
    cd "${REPO_DIR}"
    export_distributed_env
    echo "clip_jax_job ${HOST}: process ${CLIP_JAX_PROCESS_ID:-0} of ${CLIP_JAX_NUM_PROCESSES:-1}, coordinator ${CLIP_JAX_COORDINATOR_ADDRESS:-none}"
    echo "clip_jax_job ${HOST}: $(date -u +%FT%TZ) python -m clip_jax.main $*"
    # SIGTERM (a preemption notice, or `worker.sh stop`) reaches python too, which saves a
    # checkpoint and exits 0; the job is then stopped, not finished: record 143 so that
    # watch.sh restarts it rather than taking it for done.
    terminated=0
    trap 'terminated=1' TERM
    rc=0
    python -m clip_jax.main "$@" || rc=$?
    if ((terminated && rc == 0)); then
      rc=143
    fi
    echo "${rc}" >"${JOB_DIR}/exit"
    echo "clip_jax_job ${HOST}: $(date -u +%FT%TZ) exit ${rc}"
    ;;
  status)
    if [[ -n "$(job_pid)" ]]; then
      echo "clip_jax_job ${HOST}: running"
    elif [[ -f "${JOB_DIR}/exit" ]]; then
      echo "clip_jax_job ${HOST}: exit $(<"${JOB_DIR}/exit")"
    else
      echo "clip_jax_job ${HOST}: absent"
    fi
    ;;
  stop)
    stop_job
    echo "clip_jax_job ${HOST}: stopped"
    ;;
  log)
    tail -n +1 -F "${JOB_DIR}/log"
    ;;
  upload-log)
    [[ -n "${2:-}" ]] || { echo 'usage: worker.sh upload-log gs://BUCKET/DIR' >&2; exit 2; }
    gcloud storage cp "${JOB_DIR}/log" "${2%/}/${HOST}.log"
    ;;
  -h | --help)
    sed -n '2,/^set/{/^set/d;s/^# \{0,1\}//;p}' "$0"
    ;;
  *)
    sed -n '2,/^set/{/^set/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
    ;;
esac
