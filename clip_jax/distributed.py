"""Multi-process start-up: `jax.distributed.initialize` when the run has several processes.

Call `initialize()` first thing in a program, before any JAX computation. It starts the
distributed runtime when, in this order:
  1. a coordinator is given (arguments, or the environment variables
     CLIP_JAX_COORDINATOR_ADDRESS / CLIP_JAX_NUM_PROCESSES / CLIP_JAX_PROCESS_ID that
     launch/gpu/launch.sh sets): those values are used as they are;
  2. the process runs in a multi-process cluster JAX can read (a TPU pod slice or
     multislice, SLURM with several tasks, Open MPI with several ranks): JAX finds the
     coordinator, process count and id itself;
and does nothing for a single process, so the same program runs on a laptop.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax

ENV_COORDINATOR = 'CLIP_JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'CLIP_JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'CLIP_JAX_PROCESS_ID'


def _int_env(env: Mapping[str, str], key: str) -> int | None:
  value = env.get(key, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{key}: expected an integer, got {value!r}') from None


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """'tpu', 'slurm' or 'mpi' when the environment describes several processes, else None."""
  env = os.environ if env is None else env
  if (len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]) > 1
      or env.get('MEGASCALE_COORDINATOR_ADDRESS')):
    return 'tpu'
  tasks = _int_env(env, 'SLURM_STEP_NUM_TASKS') or _int_env(env, 'SLURM_NTASKS')
  if env.get('SLURM_JOB_ID') and tasks and tasks > 1:
    return 'slurm'
  ranks = _int_env(env, 'OMPI_COMM_WORLD_SIZE')
  if ranks and ranks > 1:
    return 'mpi'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               env: Mapping[str, str] | None = None) -> bool:
  """Starts the JAX distributed runtime if this run has several processes.

  Returns True when the runtime is (now) running, False for a single-process run.
  """
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
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
      return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return True
  if detect_cluster(env) is None:
    return False
  jax.distributed.initialize(local_device_ids=local_device_ids)
  return True


def describe() -> str:
  """One line for the start-up log: process, local and global device counts."""
  return (f'process {jax.process_index()} of {jax.process_count()}: '
          f'{jax.local_device_count()} local / {jax.device_count()} global '
          f'{jax.devices()[0].platform} devices')
