"""Checkpoints: model-only round trips, training checkpoints, pruning, resharding, atomicity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import checkpoint
from clip_jax import config as base
from clip_jax.models import build_model, init_variables


@pytest.fixture(scope='module')
def tiny():
  config = base.get_config('tiny')
  model = build_model(config.model)
  variables = jax.jit(lambda rng: init_variables(model, config.model, rng))(jax.random.key(0))
  return config, variables


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_and_load_model_round_trip(tmp_path, tiny):
  config, variables = tiny
  config = config.copy_and_resolve_references()
  config.total_steps = 123
  path = checkpoint.save_model(tmp_path, config, variables, step=7)
  assert path.name == '7' and (tmp_path / 'config.json').exists()
  loaded_config, loaded = checkpoint.load_model(tmp_path)
  _assert_trees_equal(variables, loaded)
  assert loaded_config.total_steps == 123 and loaded_config.model.name == 'tiny'
  assert loaded_config.model.to_dict() == json.loads(config.model.to_json())
  assert checkpoint.latest_step(tmp_path) == 7


def test_save_model_accepts_numpy_and_refuses_existing_step(tmp_path, tiny):
  config, variables = tiny
  as_numpy = jax.tree.map(np.asarray, variables)
  checkpoint.save_model(tmp_path, config, as_numpy)
  _assert_trees_equal(as_numpy, checkpoint.load_model(tmp_path, step=0)[1])
  with pytest.raises(FileExistsError, match='step 0 exists already'):
    checkpoint.save_model(tmp_path, config, as_numpy)


def test_load_model_errors_name_the_path(tmp_path, tiny):
  with pytest.raises(FileNotFoundError, match='config.json'):
    checkpoint.load_model(tmp_path)
  config, variables = tiny
  checkpoint.save_model(tmp_path, config, variables, step=3)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint at step 5; found steps \[3\]'):
    checkpoint.load_model(tmp_path, step=5)
  (tmp_path / 'config.json').write_text('{not json')
  with pytest.raises(ValueError, match='config.json: not valid JSON'):
    checkpoint.load_model(tmp_path)


def test_workdir_of_another_architecture_is_refused(tmp_path, tiny):
  config, variables = tiny
  checkpoint.save_model(tmp_path, config, variables)
  other = base.get_config('tiny')
  other.model.vision.width = 32
  with pytest.raises(ValueError, match=r"written by architecture 'tiny'.*config.model.vision"):
    checkpoint.check_compatible(tmp_path, other)
  # Options that keep the shapes (dtype, remat) are fine.
  same = base.get_config('tiny')
  same.model.dtype = 'bfloat16'
  checkpoint.check_compatible(tmp_path, same)


def _train_tree(mesh, value):
  sharded = NamedSharding(mesh, P(('data', 'fsdp')))
  variables = {'params': {'w': jax.device_put(jnp.full((8, 4), value), sharded),
                          'b': jnp.full((3,), value)}}
  opt_state = {'mu': jax.device_put(jnp.full((8, 4), -value), sharded),
               'count': jnp.asarray(int(value), jnp.int32)}
  return variables, opt_state


def test_train_checkpoints_pruned_and_meta_kept(tmp_path):
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'model'))
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=2, keep=2, keep_every=4) as ckpt:
    for step in range(1, 11):
      variables, opt_state = _train_tree(mesh, float(step))
      meta = {'data': {'epoch': np.int64(1), 'position': np.int32(step)}}
      ckpt.save(step, variables, opt_state, meta, force=step == 9)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9, 10]
    assert not ckpt.save(10, variables, opt_state, meta, force=True)   # already there
    variables, opt_state, meta = ckpt.restore(
        8, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        variables),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                     opt_state))
  assert meta == {'step': 8, 'kind': 'train', 'data': {'epoch': 1, 'position': 8}}
  np.testing.assert_array_equal(variables['params']['w'], np.full((8, 4), 8.0))
  assert int(opt_state['count']) == 8
  # load_model reads the model item of a training checkpoint.
  checkpoint.write_config(tmp_path, base.get_config('tiny'))
  _, loaded = checkpoint.load_model(tmp_path)
  np.testing.assert_array_equal(loaded['params']['b'], np.full((3,), 10.0))


def test_orbax_decides_the_regular_saves(tmp_path):
  """Every `every_steps`-th step and only those (no save at the first step of a fresh run,
  as orbax's save_interval_steps would add); `force` adds the off-interval ones (the last
  step, a SIGTERM); a step at or before the latest is never due."""
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'model'))
  variables, opt_state = _train_tree(mesh, 1.0)
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=3, keep=10) as ckpt:
    assert [step for step in range(1, 8) if ckpt.should_save(step)] == [3, 6]
    saved = [step for step in range(1, 8)
             if ckpt.save(step, variables, opt_state, {}, force=step == 7)]
    ckpt.wait()
    assert saved == [3, 6, 7] and ckpt.all_steps() == [3, 6, 7]
    assert not ckpt.should_save(6) and ckpt.should_save(9)


def test_restore_onto_another_mesh(tmp_path):
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'model'))
  variables, opt_state = _train_tree(mesh, 5.0)
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=1) as ckpt:
    ckpt.save(5, variables, opt_state, {})
  # Another process shape: 4 devices, (2, 2, 1), with the weight split over `model`.
  new_mesh = jax.make_mesh((2, 2, 1), ('data', 'fsdp', 'model'), devices=jax.devices()[:4])
  target = lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=NamedSharding(new_mesh, spec))
  abstract_variables = {'params': {'w': target(variables['params']['w'], P(None, 'fsdp')),
                                   'b': target(variables['params']['b'], P())}}
  abstract_opt = {'mu': target(opt_state['mu'], P('data')), 'count': target(opt_state['count'], P())}
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=1) as ckpt:
    restored, restored_opt, _ = ckpt.restore(ckpt.latest_step(), abstract_variables, abstract_opt)
  assert restored['params']['w'].sharding == NamedSharding(new_mesh, P(None, 'fsdp'))
  assert len(restored['params']['w'].sharding.device_set) == 4
  np.testing.assert_array_equal(restored['params']['w'], np.full((8, 4), 5.0))
  np.testing.assert_array_equal(restored_opt['mu'], np.full((8, 4), -5.0))


def test_half_written_checkpoint_is_not_the_latest(tmp_path):
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'model'))
  variables, opt_state = _train_tree(mesh, 1.0)
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=1) as ckpt:
    ckpt.save(3, variables, opt_state, {})
  # What a kill -9 during an async save leaves behind: an unrenamed tmp directory.
  unfinished = tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp-1700000000000000'
  (unfinished / 'model').mkdir(parents=True)
  (unfinished / 'model' / 'partial').write_bytes(b'\0' * 10)
  assert checkpoint.latest_step(tmp_path) == 3
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=1) as ckpt:
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
  checkpoint.write_config(tmp_path, base.get_config('tiny'))
  _, loaded = checkpoint.load_model(tmp_path)
  np.testing.assert_array_equal(loaded['params']['b'], np.ones(3))
