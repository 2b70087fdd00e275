"""Renamed mesh axes: config.mesh names every axis role, and nothing assumes the defaults.

The same (2, 2, 2) mesh as ('data', 'fsdp', 'model') and as ('replica', 'shard',
'tensor'): batches, parameters, losses and a train step must come out the same.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import config as config_lib
from clip_jax import sharding, train_step
from clip_jax.models.clip import build_model
from clip_jax.models.params import flatten_names
from test_losses import LOSSES, _all_losses, _inputs
from test_train_step import assert_trees_close, make_batch, small_config

RENAMED = dict(axes=('replica', 'shard', 'tensor'), batch_axes=('replica', 'shard'),
               fsdp_axis='shard', logical_rules=(('heads', 'tensor'), ('mlp', 'tensor')))
RENAME = {'data': 'replica', 'fsdp': 'shard', 'model': 'tensor'}


def renamed(config):
  config.mesh.update(RENAMED, shape=(2, 2, 2))
  return config


def _renamed_spec(spec):
  rename = lambda a: tuple(RENAME[x] for x in a) if isinstance(a, tuple) else RENAME.get(a, a)
  return P(*(rename(a) for a in spec))


def test_the_batch_is_split_over_both_renamed_batch_axes():
  layout = sharding.layout_from_config(renamed(config_lib.get_config('tiny')).mesh)
  assert layout.mesh.axis_names == ('replica', 'shard', 'tensor')
  assert layout.batch_axes == ('replica', 'shard') and layout.data_parallel_size == 4
  assert sharding.batch_sharding(layout, 2).spec == P(('replica', 'shard'), None)
  x = jax.device_put(np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
                     sharding.batch_sharding(layout, 2))
  assert {s.data.shape for s in x.addressable_shards} == {(4, 3)}    # split 4 ways, not 2


def test_parameters_are_placed_as_with_the_default_names():
  config, renamed_config = small_config(), renamed(small_config())
  model = build_model(config.model)
  _, default = train_step.train_state_shardings(config, model, sharding.make_mesh((2, 2, 2)))
  _, renamed_shardings = train_step.train_state_shardings(
      renamed_config, model, sharding.layout_from_config(renamed_config.mesh))
  default_specs = flatten_names(jax.tree.map(lambda s: s.spec, default.params))
  renamed_specs = flatten_names(jax.tree.map(lambda s: s.spec, renamed_shardings.params))
  assert renamed_specs == {n: _renamed_spec(s) for n, s in default_specs.items()}
  kernel = 'visual/transformer/resblocks_0/mlp/c_fc/kernel'
  assert renamed_specs[kernel] == P('shard', 'tensor')                 # FSDP over 'shard'


def test_losses_equal_the_default_names():
  x, y, scale, bias = _inputs()
  default = _all_losses(sharding.make_mesh((2, 2, 2)))(x, y, scale, bias)
  layout = sharding.layout_from_config(renamed(config_lib.get_config('tiny')).mesh)
  out = _all_losses(layout)(x, y, scale, bias)
  for name in LOSSES:
    np.testing.assert_allclose(out[name][0], default[name][0], rtol=1e-6, err_msg=name)
    for g, g_default in zip(out[name][1], default[name][1]):
      np.testing.assert_allclose(g, g_default, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(out[name][2]) == float(default[name][2]), name


def test_a_train_step_gives_the_loss_of_the_default_names():
  config = renamed(small_config())
  model = build_model(config.model)
  layout = sharding.layout_from_config(config.mesh)
  state, shardings = train_step.create_train_state(config, model, layout, jax.random.key(0))
  host = jax.device_get(state)
  default_config = small_config()
  default_mesh = sharding.make_mesh((2, 2, 2))
  _, default_shardings = train_step.train_state_shardings(default_config, model, default_mesh)
  default_state = jax.device_put(host, default_shardings)
  batch = make_batch(config)
  new, metrics = train_step.make_train_step(config, model, layout, shardings)(state, batch)
  default_new, default_metrics = train_step.make_train_step(
      default_config, model, default_mesh, default_shardings)(default_state, batch)
  for key in ('loss', 'grad_norm', 'accuracy'):
    np.testing.assert_allclose(metrics[key], default_metrics[key], rtol=1e-5, err_msg=key)
  assert_trees_close(jax.device_get(new.params), jax.device_get(default_new.params))
  kernel = new.params['visual']['transformer']['resblocks_0']['mlp']['c_fc']['kernel']
  assert kernel.sharding.spec == P('shard', 'tensor')


@pytest.mark.parametrize('key, value, match', [
    ('batch_axes', ('replica', 'data'), r"config\.mesh\.batch_axes: \['data'\] not in"),
    ('batch_axes', (), r'config\.mesh\.batch_axes: \(\): expected one or more'),
    ('fsdp_axis', 'fsdp', r"config\.mesh\.fsdp_axis: 'fsdp' not in config\.mesh\.axes"),
    ('logical_rules', (('heads', 'model'),), r"config\.mesh\.logical_rules: \('heads', 'model'\)"),
    ('axes', ('replica', 'shard', 'shard'), r'config\.mesh\.axes: .* names an axis twice'),
    ('shape', (2, 4), r'config\.mesh\.shape: \(2, 4\) has 2 entries but config\.mesh\.axes'),
])
def test_a_role_naming_an_unknown_axis_is_refused(key, value, match):
  config = renamed(config_lib.get_config('tiny'))
  config.mesh[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)
  with pytest.raises(ValueError, match=match):
    sharding.layout_from_config(config.mesh)


def test_no_fsdp_and_a_bare_mesh_with_other_names():
  config = renamed(config_lib.get_config('tiny'))
  config.mesh.fsdp_axis = ''                       # '' = parameters never FSDP-split
  config_lib.validate(config)
  bare = sharding.make_mesh((2, 2, 2), RENAMED['axes'])
  # Without its description a bare mesh is read with the default roles, which do not fit.
  with pytest.raises(ValueError, match=r'config\.mesh\.batch_axes.*layout_from_config'):
    sharding.batch_sharding(bare)
  assert sharding.as_layout(bare, config.mesh).batch_axes == ('replica', 'shard')
  other = dict(axes=('a', 'b', 'c'), batch_axes=('a',), fsdp_axis='', logical_rules=())
  with pytest.raises(ValueError, match=r'config\.mesh\.axes: .* the mesh given has the axes'):
    sharding.as_layout(bare, other)
