#!/usr/bin/env bash
# Sets up every worker of the slice: copies this checkout (tracked and untracked files,
# not what .gitignore lists) and installs it with jax[tpu] into ~/clip_jax_venv.
#
#   launch/tpu/setup.sh --zone=us-central2-b --name=my-tpu
#
# Run it again after changing the code: it replaces ~/clip_jax on every worker.
# REMOTE_PYTHON (default python3.11) is the interpreter the environment is built from;
# it is installed with apt when the image lacks it.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"

setup_workers() {
  local flags archive
  mapfile -t flags < <(location_flags)
  archive="${TMPDIR:-/tmp}/clip_jax_${TPU_NAME}.tar.gz"
  if git -C "${REPO_DIR}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # git's own list (tracked + untracked, less what .gitignore names): a virtual
    # environment or a workdir inside the checkout (gigabytes) is never shipped.
    # tar's --exclude-vcs-ignores does not understand patterns such as '/.venv/'.
    # The checkout as it is now is what runs: a tracked file deleted but not yet
    # committed is left out (tar would stop on it).
    local files="${TMPDIR:-/tmp}/clip_jax_${TPU_NAME}.files" path
    if [[ "${DRY_RUN}" != 1 ]]; then
      while IFS= read -r -d '' path; do
        if [[ -e "${REPO_DIR}/${path}" ]]; then printf '%s\0' "${path}"; fi
      done < <(git -C "${REPO_DIR}" ls-files -z --cached --others --exclude-standard) >"${files}"
    fi
    run tar -czf "${archive}" -C "${REPO_DIR}" --null -T "${files}"
  else
    run tar -czf "${archive}" -C "${REPO_DIR}" --exclude=.venv --exclude=workdir \
      --exclude=__pycache__ .
  fi
  run "${GCLOUD}" compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:clip_jax.tar.gz" \
    "${flags[@]}" --worker=all
  local install
  install="set -e; "
  install+="command -v ${REMOTE_PYTHON} >/dev/null || { sudo apt-get -qq update && "
  install+="sudo apt-get -qq install -y ${REMOTE_PYTHON} ${REMOTE_PYTHON}-venv; }; "
  install+="rm -rf ${REMOTE_REPO} && mkdir -p ${REMOTE_REPO} && "
  install+="tar -xzf ~/clip_jax.tar.gz -C ${REMOTE_REPO} && "
  install+="${REMOTE_PYTHON} -m venv ${REMOTE_VENV} && "
  install+="${REMOTE_VENV}/bin/pip install -q --upgrade pip && "
  # One resolver run: jax[tpu] (libtpu) within the jax range clip_jax pins.
  install+="${REMOTE_VENV}/bin/pip install -q -e ${REMOTE_REPO} 'jax[tpu]' && "
  install+="${REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
  on_workers "${install}"
  echo "set up clip_jax in ${REMOTE_REPO} with ${REMOTE_VENV} on every worker of '${TPU_NAME}'" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  parse_flags '' "$@"
  setup_workers
fi
