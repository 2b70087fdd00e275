"""Two processes on localhost (4 fake CPU devices each) run the sharded step together and
reproduce the single-process loss."""

import jax
import numpy as np
import pytest

from clip_jax import distributed
from clip_jax.models.clip import build_model, init_variables
from test_losses import reference_loss
from localhost_workers import run_two_workers
from test_train_step import make_batch, small_config

WORKER = r'''
import json, sys
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from clip_jax import distributed
# Before any computation, as a real launch does.
assert distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                              process_id=int(sys.argv[2]))
import jax
import numpy as np
from clip_jax import train_step
from clip_jax.models.clip import build_model
from clip_jax.sharding import batch_sharding, make_mesh
from test_train_step import make_batch, small_config

config = small_config('softmax')
model = build_model(config.model)
mesh = make_mesh((2, 2, 2))
state, shardings = train_step.create_train_state(config, model, mesh, jax.random.key(0))
host_batch = {k: np.asarray(v) for k, v in make_batch(config).items()}
# Every process holds the same host batch; each fills only its own devices' rows.
batch = {k: jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim),
                                         lambda index, v=v: v[index])
         for k, v in host_batch.items()}
step = train_step.make_train_step(config, model, mesh, shardings)
state, metrics = step(state, batch)
print('RESULT ' + json.dumps(dict(
    process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
    local_devices=jax.local_device_count(), loss=float(metrics['loss']),
    describe=distributed.describe())), flush=True)
'''


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_loss(tmp_path):
  results = run_two_workers(WORKER, tmp_path, timeout=400)
  assert sorted(r['process'] for r in results) == [0, 1]
  assert all(r['processes'] == 2 and r['devices'] == 8 and r['local_devices'] == 4
             for r in results)
  assert results[0]['describe'].endswith('4 local / 8 global cpu devices')

  # The single-process reference: the paper's loss over the whole batch, one device.
  config = small_config('softmax')
  model = build_model(config.model)
  batch = make_batch(config)

  @jax.jit
  def reference():
    variables = init_variables(model, config.model, jax.random.key(0))
    image, text, scale = model.apply(variables, batch['image'], batch['text'], train=True)
    return reference_loss('softmax', image, text, scale, 0.0)
  expected = float(reference())
  for r in results:
    np.testing.assert_allclose(r['loss'], expected, rtol=1e-5, atol=1e-5)


def test_initialize_is_a_no_op_for_one_process_and_checks_its_inputs():
  assert distributed.initialize(env={}) is False
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'slurm'
  assert distributed.detect_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert distributed.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'tpu'
  assert distributed.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a'}) is None
  assert distributed.detect_cluster({'OMPI_COMM_WORLD_SIZE': '2'}) == 'mpi'
  env = {distributed.ENV_COORDINATOR: '10.0.0.1:1234', distributed.ENV_NUM_PROCESSES: '1',
         distributed.ENV_PROCESS_ID: '0'}
  assert distributed.initialize(env=env) is False              # one process: nothing to join
  with pytest.raises(ValueError, match='CLIP_JAX_NUM_PROCESSES'):
    distributed.initialize(env={distributed.ENV_COORDINATOR: '10.0.0.1:1234'})
  with pytest.raises(ValueError, match='HOST:PORT'):
    distributed.initialize(coordinator_address='10.0.0.1', num_processes=2, process_id=0, env={})
  with pytest.raises(ValueError, match='CLIP_JAX_PROCESS_ID'):
    distributed.initialize(coordinator_address='h:1', num_processes=2, process_id=2, env={})
  with pytest.raises(ValueError, match='CLIP_JAX_NUM_PROCESSES: expected an integer'):
    distributed.initialize(env={distributed.ENV_COORDINATOR: 'h:1',
                                distributed.ENV_NUM_PROCESSES: 'two'})
