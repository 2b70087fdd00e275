"""Multi-process start-up: `jax.distributed.initialize` when the run has several processes.

Call `initialize()` first thing in a program, before any JAX computation. It starts the
distributed runtime when, in this order:
  1. a coordinator is given (arguments, or the environment variables
     CLIP_JAX_COORDINATOR_ADDRESS / CLIP_JAX_NUM_PROCESSES / CLIP_JAX_PROCESS_ID that
     launch/gpu/launch.sh and launch/tpu/worker.sh set): those values are used as they are;
  2. JAX's own cluster detection (the `jax._src.clusters.ClusterEnv` subclasses that
     `jax.distributed.initialize()` tries when called without arguments: Open MPI, SLURM,
     a Cloud TPU VM's metadata server, GKE TPU variables, Kubernetes indexed Jobs) finds a
     cluster of several processes: JAX joins it, exactly as it would on its own;
and does nothing for a single process, so the same program runs on a laptop.

A process that would run alone although its environment says the run has several (a
TPU VM whose metadata lists several workers, TPU_WORKER_HOSTNAMES with several hosts,
SLURM with several tasks, Open MPI with several ranks) raises ClusterError instead: each
worker training alone would write the same workdir. CLIP_JAX_NUM_PROCESSES=1 runs alone
on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping, Sequence

import jax
# JAX's cluster detection is private API; setup.py pins jax to one minor version.
from jax._src import cloud_tpu_init as _cloud_tpu_init
from jax._src import clusters as _jax_clusters
from jax._src import distributed as _jax_distributed
from jax._src import hardware_utils as _hardware_utils
from jax._src.clusters import cloud_tpu_cluster as _cloud_tpu_cluster

ENV_COORDINATOR = 'CLIP_JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'CLIP_JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'CLIP_JAX_PROCESS_ID'

# JAX's default, passed explicitly so that the start-up line can say how long it waits.
INIT_TIMEOUT_S = 300

_LABELS = {
    'OmpiCluster': 'Open MPI',
    'SlurmCluster': 'SLURM',
    'GceTpuCluster': 'Cloud TPU VM metadata',
    'GkeTpuCluster': 'GKE TPU environment',
    'K8sCluster': 'Kubernetes indexed Job',
    'Mpi4pyCluster': 'mpi4py',
}
_SET_EXPLICITLY = (f'or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} on '
                   f'every process ({ENV_NUM_PROCESSES}=1 runs this one alone on purpose)')

# How this process started, for describe().
_joined: str | None = None


class ClusterError(RuntimeError):
  """The environment says the run has several processes, but this one would run alone."""


@dataclasses.dataclass(frozen=True)
class _Claim:
  """What the environment says about the run's size, whether or not JAX can join it."""
  kind: str                 # 'tpu', 'slurm' or 'mpi'
  processes: int | None     # None: several, how many unknown
  evidence: str             # who says so
  why_alone: str            # why JAX's detection did not join it
  remedy: str

  def message(self) -> str:
    size = f'{self.processes} processes' if self.processes else 'several processes'
    return (f'{self.evidence} says this run has {size}, but this process would run alone: '
            f'{self.why_alone}. Each process would train alone into the same workdir. '
            f'{self.remedy}, {_SET_EXPLICITLY}.')


def _int_env(env: Mapping[str, str], key: str) -> int | None:
  value = env.get(key, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{key}: expected an integer, got {value!r}') from None


def _present(cluster: type[_jax_clusters.ClusterEnv]) -> bool:
  # JAX's K8sCluster can only join an indexed Job (its get_process_id reads
  # JOB_COMPLETION_INDEX). In any other pod (a notebook server, a CI runner: single
  # processes) its is_env_present would load the in-cluster config and its process
  # count would read the Job through the Kubernetes API, failing without the rights to.
  if (issubclass(cluster, _jax_clusters.K8sCluster)
      and 'JOB_COMPLETION_INDEX' not in os.environ):
    return False
  return cluster.is_env_present()


def find_jax_cluster() -> type[_jax_clusters.ClusterEnv] | None:
  """The cluster environment `jax.distributed.initialize()` would use here, or None.

  The same choice as JAX's `ClusterEnv.auto_detect_unset_distributed_params`: the first
  registered environment, in JAX's order, that is not opt-in (mpi4py) and is present.
  It reads os.environ (and, on a Cloud TPU VM, the metadata server), as JAX does.
  """
  return next((c for c in _jax_clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if not c.opt_in_only_method and _present(c)), None)


_START_ALL = ('start the same command on every worker (launch/tpu/train.sh, or gcloud '
              'compute tpus tpu-vm ssh NAME --worker=all --command=...)')


def _tpu_why_alone(metadata: bool) -> tuple[str, str]:
  """Why JAX's TPU detection did not join the slice, and what to do about it."""
  if not _cloud_tpu_init.running_in_cloud_tpu_vm:
    return ("JAX does not see a Cloud TPU VM (it needs libtpu, from pip install "
            "'jax[tpu]', and TPU chips on this host)",
            f'Install jax[tpu] (launch/tpu/setup.sh does) and {_START_ALL}')
  if metadata and os.environ.get('TPU_SKIP_MDS_QUERY') is not None:
    return ('TPU_SKIP_MDS_QUERY is set, so JAX does not read the TPU VM metadata',
            f'Unset TPU_SKIP_MDS_QUERY and {_START_ALL}')
  return "JAX's cluster detection did not find the slice", _START_ALL[0].upper() + _START_ALL[1:]


def _tpu_env_claim(env: Mapping[str, str]) -> _Claim | None:
  # GKE (and multislice) describe the slice in variables; JAX's GkeTpuCluster reads
  # TPU_PROCESS_ADDRESSES first, then TPU_WORKER_HOSTNAMES.
  hosts_key = 'TPU_PROCESS_ADDRESSES' if env.get('TPU_PROCESS_ADDRESSES') else 'TPU_WORKER_HOSTNAMES'
  hosts = [h for h in env.get(hosts_key, '').split(',') if h.strip()]
  slices = _int_env(env, 'MEGASCALE_NUM_SLICES') or 1
  multislice = slices > 1 or bool(env.get('MEGASCALE_COORDINATOR_ADDRESS'))
  if len(hosts) <= 1 and not multislice:
    return None
  evidence = []
  if hosts:
    evidence.append(f'{hosts_key} ({len(hosts)} host(s))')
  if slices > 1:
    evidence.append(f'MEGASCALE_NUM_SLICES={slices}')
  elif multislice:
    evidence.append('MEGASCALE_COORDINATOR_ADDRESS (a multislice run)')
  processes = max(len(hosts), 1) * slices if hosts or slices > 1 else None
  return _Claim('tpu', processes, ' and '.join(evidence), *_tpu_why_alone(metadata=False))


def _tpu_metadata_claim() -> _Claim | None:
  """What the TPU VM metadata server says, read with JAX's own GceTpuCluster code.

  JAX reads it only where it believes it runs on a Cloud TPU VM; this reads it without
  that gate, to notice a slice JAX did not join.
  """
  # Only where a metadata server is meant to answer: JAX's query retries for seconds,
  # each try waiting up to 60 s. GCE_METADATA_IP points at one explicitly (JAX's own
  # override); TPU chips on this host mean a TPU VM (JAX sets TPU_SKIP_MDS_QUERY itself
  # only where there are none, so there it is the user's).
  if not os.environ.get('GCE_METADATA_IP'):
    chips, _ = _hardware_utils.num_available_tpu_chips_and_device_id()
    if not chips or os.environ.get('TPU_SKIP_MDS_QUERY') is not None:
      return None
  gce = _jax_clusters.GceTpuCluster
  try:
    worker, status = _cloud_tpu_cluster.get_metadata('agent-worker-number')
    if status != 200:
      return None                # a GCE VM, not a TPU worker
    _, status = _cloud_tpu_cluster.get_metadata('worker-network-endpoints')
    if status != 200:
      return None
    hosts = gce._get_worker_list_in_slice()  # pylint: disable=protected-access
    processes = gce.get_process_count()      # hosts x MEGASCALE_NUM_SLICES
    if processes <= 1:
      return None
    accelerator, status = _cloud_tpu_cluster.get_metadata('accelerator-type')
  except OSError:                # unreachable (requests' errors are OSErrors)
    return None
  url = 'http://' + os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  details = [f'worker-network-endpoints: {len(hosts)} workers', f'this is worker {worker.strip()}']
  if status == 200:
    details.insert(0, f'accelerator-type {accelerator.strip()}')
  return _Claim('tpu', processes, f'the TPU VM metadata at {url} ({", ".join(details)})',
                *_tpu_why_alone(metadata=True))


def _claim(env: Mapping[str, str], real: bool) -> _Claim | None:
  claim = _tpu_env_claim(env)
  if claim:
    return claim
  tasks = _int_env(env, 'SLURM_STEP_NUM_TASKS') or _int_env(env, 'SLURM_NTASKS')
  if env.get('SLURM_JOB_ID') and tasks and tasks > 1:
    # What JAX's SlurmCluster.is_env_present requires.
    missing = [k for k in ('SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                           'SLURM_LOCALID') if k not in env]
    why = (f"JAX's SLURM detection needs {', '.join(missing)}, which srun sets" if missing
           else "JAX's SLURM detection did not find the job")
    return _Claim('slurm', tasks, f'SLURM ({tasks} tasks)', why,
                  'Start every task with srun (launch/gpu/slurm.sbatch does)')
  ranks = _int_env(env, 'OMPI_COMM_WORLD_SIZE')
  if ranks and ranks > 1:
    why = ("JAX's Open MPI detection needs OMPI_MCA_orte_hnp_uri, which Open MPI 4's "
           "mpirun sets and Open MPI 5's does not"
           if 'OMPI_MCA_orte_hnp_uri' not in env
           else "JAX's Open MPI detection did not find the job")
    return _Claim('mpi', ranks, f'Open MPI (OMPI_COMM_WORLD_SIZE={ranks})', why,
                  'Start the ranks with an mpirun JAX can read')
  # JAX reads the metadata server's address from os.environ, not from a given mapping.
  return _tpu_metadata_claim() if real else None


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """'tpu', 'slurm' or 'mpi' when the environment says the run has several processes.

  From the variables of `env` (default os.environ) and, for os.environ on a TPU VM,
  from its metadata server. This is what the environment claims, whether or not JAX's
  detection can join it; initialize() raises ClusterError when it cannot.
  """
  real = env is None or env is os.environ
  claim = _claim(os.environ if env is None else env, real)
  return claim.kind if claim else None


def _announce(how: str, process_id: int, num_processes: int) -> None:
  # Printed and flushed before joining: a missing peer aborts the process from C++
  # after the timeout, which would lose buffered output.
  print(f'initializing distributed: {how}, process {process_id} of {num_processes}; '
        f'waiting up to {INIT_TIMEOUT_S} s for '
        'all of them to start (then JAX aborts)',
        file=sys.stderr, flush=True)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               env: Mapping[str, str] | None = None) -> bool:
  """Starts the JAX distributed runtime if this run has several processes.

  Returns True when the runtime is (now) running, False for a single-process run.
  `env` replaces os.environ for the CLIP_JAX_* variables and the variables that say
  how large the run is; JAX's own detection reads os.environ, so it runs only without
  `env`. Raises ClusterError where the environment says the run has several processes
  but none can be joined.
  """
  global _joined
  real = env is None or env is os.environ
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    _joined = _joined or 'jax.distributed started before clip_jax.distributed.initialize'
    return True
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(f'coordinator {coordinator_address!r} given without the number of '
                       f'processes and this process id: set --num_processes/--process_id '
                       f'or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}')
    if ':' not in coordinator_address:
      raise ValueError(f'{ENV_COORDINATOR} / --coordinator_address: expected HOST:PORT, got '
                       f'{coordinator_address!r}')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'{ENV_PROCESS_ID} / --process_id: expected 0..{num_processes - 1}, '
                       f'got {process_id}')
    if num_processes == 1:
      _joined = f'one process ({ENV_NUM_PROCESSES}=1)'
      return False
    how = f'explicit coordinator ({ENV_COORDINATOR} or arguments)'
    _announce(how, process_id, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=INIT_TIMEOUT_S)
    _joined = how
    return True
  if num_processes == 1:
    # Alone on purpose (e.g. one worker of a slice, for debugging): no detection.
    _joined = f'one process ({ENV_NUM_PROCESSES}=1)'
    return False
  cluster = find_jax_cluster() if real else None
  if cluster is not None:
    label = f"{_LABELS.get(cluster.__name__, cluster.name or 'cluster')} (JAX's {cluster.__name__})"
    count = cluster.get_process_count()
    if count <= 1:
      _joined = f'single process ({label}: 1 process)'
      return False
    _announce(label, cluster.get_process_id(), count)
    # JAX detects again, the same way: pinning the method keeps it to this environment
    # (K8sCluster has no name; nothing before it in JAX's order was present).
    jax.distributed.initialize(local_device_ids=local_device_ids,
                               cluster_detection_method=cluster.name or None,
                               initialization_timeout=INIT_TIMEOUT_S)
    _joined = label
    return True
  claim = _claim(env, real)
  if claim:
    raise ClusterError(claim.message())
  _joined = 'single process (no multi-process cluster detected)'
  return False


def describe() -> str:
  """One line for the start-up log: how this process joined, its index, device counts."""
  how = _joined or 'clip_jax.distributed.initialize() not called'
  if jax.distributed.is_initialized():
    how += f', coordinator {_jax_distributed.global_state.coordinator_address}'
  return (f'{how}; process {jax.process_index()} of {jax.process_count()}: '
          f'{jax.local_device_count()} local / {jax.device_count()} global '
          f'{jax.devices()[0].platform} devices')
