"""The GPU launcher for real: two processes on this machine (CPU devices, a 127.0.0.1
coordinator) form one JAX job through launch/gpu/launch.sh and train `tiny` for a few
steps with `python -m clip_jax.main`, writing one checkpoint together."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from localhost_workers import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch' / 'gpu' / 'launch.sh'
NUM_PROCESSES = 2
STEPS = 2
# Generous for a loaded 2-core machine; about a minute when it is idle.
TIMEOUT_S = 420


@pytest.mark.slow
def test_two_processes_train_tiny_through_the_launcher(tmp_path):
  workdir = tmp_path / 'run'
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('CLIP_JAX_', 'SLURM_', 'JAX_', 'XLA_', 'TPU_'))}
  # Two CPU devices per process: 4 global devices over 2 processes.
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]))
  trainer_flags = [
      '--config=configs/tiny.py', f'--workdir={workdir}', f'--config.total_steps={STEPS}',
      '--config.batch_size=8', '--config.builtin.num_train=64', '--config.builtin.num_shards=2',
      f'--config.checkpoint.every_steps={STEPS}', '--config.log.every_steps=1',
      '--config.log.tensorboard=False', '--config.eval.zeroshot=',
      '--config.eval.retrieval=']
  coordinator = f'127.0.0.1:{free_port()}'
  logs = [tmp_path / f'process_{i}.log' for i in range(NUM_PROCESSES)]
  processes = []
  for process_id, log in enumerate(logs):
    with open(log, 'w') as out:
      processes.append(subprocess.Popen(
          ['bash', str(LAUNCH), f'--coordinator={coordinator}',
           f'--num-processes={NUM_PROCESSES}', f'--process-id={process_id}', '--',
           *trainer_flags],
          stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env))
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in processes]
  finally:
    for p in processes:   # only on failure: a process left waiting for its peer
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [log.read_text() for log in logs]
  for process_id, (code, text) in enumerate(zip(codes, texts)):
    assert code == 0, f'process {process_id} exited {code}:\n{text[-4000:]}'
    assert f'launch.sh: process {process_id} of 2, coordinator {coordinator}' in text
    # One job: each process sees its 2 devices and the 4 of the whole job.
    assert f'process {process_id} of 2: 2 local / 4 global cpu devices' in text, text[-4000:]
  assert f'done: {STEPS} steps' in texts[0]
  assert "mesh {'data': 4, 'fsdp': 1, 'model': 1} over 4 cpu device(s)" in texts[0]
  # The checkpoint both processes wrote, and the metrics process 0 logged.
  assert (workdir / 'checkpoints' / str(STEPS)).is_dir()
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in metrics if 'loss' in m] == list(range(1, STEPS + 1))
