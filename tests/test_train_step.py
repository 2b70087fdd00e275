"""The sharded train step against a plain single-device reference, on 8 fake CPU devices.

One small two-tower model (1 layer per tower, width 32) keeps compile time down; the
state is created once, sharded, and re-placed on the other meshes with device_put.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import optim, train_step
from clip_jax.config import get_config
from clip_jax.models.clip import build_model
from clip_jax.models.params import flatten_names
from clip_jax.sharding import make_mesh
from test_losses import reference_loss

GLOBAL_BATCH = 32


def small_config(loss='softmax', micro_batches=1, vision='vit'):
  config = get_config('tiny')
  if vision == 'vit':
    config.model.vision.update(width=32, layers=1, heads=2, image_size=16, patch_size=8)
  else:
    config.model.vision = dict(type='resnet', image_size=32, layers=(1, 1, 1, 1), width=8,
                               heads=4)
  config.model.text.update(width=32, layers=1, heads=2, context_length=8, vocab_size=64)
  config.model.embed_dim = 32
  config.mesh.fsdp_min_size = 256
  config.loss.name = loss
  config.train.micro_batches = micro_batches
  config.batch_size = GLOBAL_BATCH
  config.optim.update(warmup_steps=0, learning_rate=1e-3)
  return config


def make_batch(config, seed=1):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  size, context = config.model.vision.image_size, config.model.text.context_length
  texts = jax.random.randint(k2, (GLOBAL_BATCH, context), 4, config.model.text.vocab_size)
  eot = jax.random.randint(k3, (GLOBAL_BATCH,), 2, context)
  texts = jnp.where(jnp.arange(context)[None] == eot[:, None], config.model.eot_token_id, texts)
  return {'image': jax.random.normal(k1, (GLOBAL_BATCH, size, size, 3)), 'text': texts}


def reference_grads(config, model, trainable, batch_stats, batch):
  """jax.grad of the paper's loss on one device, with the whole batch at once."""
  def loss(trainable):
    variables = {'params': trainable['params']}
    if batch_stats:
      variables['batch_stats'] = batch_stats
      (image, text, scale), updates = model.apply(
          variables, batch['image'], batch['text'], train=True, mutable=['batch_stats'])
    else:
      (image, text, scale), updates = model.apply(
          variables, batch['image'], batch['text'], train=True), {}
    bias = trainable['loss_params'].get('bias', 0.0)
    return reference_loss(config.loss.name, image, text, scale, bias), updates
  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
  return value, grads, updates.get('batch_stats', {})


def assert_trees_close(actual, expected, tol=1e-5):
  actual, expected = flatten_names(actual), flatten_names(expected)
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=tol, atol=tol, err_msg=name)


@pytest.fixture(scope='module')
def setup():
  """State created sharded on (2, 2, 2), its host copy, and the single-device references."""
  config = small_config()
  model = build_model(config.model)
  mesh = make_mesh((2, 2, 2))
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.key(0))
  host = jax.device_get(state)
  batch = make_batch(config)
  return dict(config=config, model=model, mesh=mesh, state=state, shardings=shardings,
              host=host, batch=batch, references={})


def _reference(setup, loss):
  if loss not in setup['references']:
    trainable = {'params': setup['host'].params,
                 'loss_params': {'bias': np.float32(-3.0)} if loss == 'sigmoid' else {}}
    setup['references'][loss] = (trainable, reference_grads(
        small_config(loss), setup['model'], trainable, {}, setup['batch']))
  return setup['references'][loss]


def test_state_is_created_sharded_by_the_rules(setup):
  state = setup['state']
  block = state.params['visual']['transformer']['resblocks_0']
  expected = {  # name: (spec, per-device shard shape) on data=2, fsdp=2, model=2
      'mlp/c_fc/kernel': (P('fsdp', 'model'), (16, 64)),
      'mlp/c_proj/kernel': (P('model', 'fsdp'), (64, 16)),
      'attn/qkv/kernel': (P('fsdp', None, 'model'), (16, 3, 1, 16)),
      'attn/out/kernel': (P('model', None, 'fsdp'), (1, 16, 16)),
      'ln_1/scale': (P(), (32,)),
  }
  flat_block = flatten_names(block)
  moments = {n: x for n, x in flatten_names(state.opt_state).items() if '.mu/' in n or '.nu/' in n}
  for name, (spec, shard_shape) in expected.items():
    for array in [flat_block[name]] + [x for n, x in moments.items()
                                       if n.endswith('visual/transformer/resblocks_0/' + name)]:
      assert array.sharding.spec == spec, name
      assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name
  assert len([n for n in moments if n.endswith('visual/transformer/resblocks_0/mlp/c_fc/kernel')]) == 2
  token = state.params['text']['token_embedding']                     # [64, 32]
  assert token.sharding.spec == P('fsdp') and token.addressable_shards[0].data.shape == (32, 32)
  assert state.params['logit_scale'].sharding.spec == P()
  assert state.batch_stats == {} and state.loss_params == {}
  lines = train_step.describe_train_state(setup['config'], state, setup['shardings'])
  assert any('c_fc/kernel' in line and "('fsdp', 'model')" in line for line in lines)


@pytest.mark.parametrize('mesh_shape,loss', [((8, 1, 1), 'sigmoid'), ((2, 4, 1), 'ring'),
                                             ((2, 2, 2), 'softmax')])
def test_sharded_gradients_equal_single_device(setup, mesh_shape, loss):
  trainable, (ref_loss, ref_grads, _) = _reference(setup, loss)
  config = small_config(loss)
  mesh = make_mesh(mesh_shape)
  _, shardings = train_step.train_state_shardings(config, setup['model'], mesh)
  placed = {'params': jax.device_put(trainable['params'], shardings.params),
            'loss_params': trainable['loss_params']}
  grad_fn = jax.jit(train_step.make_grad_fn(config, setup['model'], mesh))
  loss_value, metrics, _, grads = grad_fn(placed, {}, setup['batch'])
  np.testing.assert_allclose(loss_value, ref_loss, rtol=1e-5, atol=1e-5)
  # float32 sums in another order once sharded: at the tests' XLA -O0 (conftest.py) one
  # sigmoid gradient entry of 256 differs by 1.9e-5 (2.6e-5 relative); a sharding
  # mistake is off by far more.
  assert_trees_close(grads, ref_grads, tol=3e-5)
  assert 0.0 <= float(metrics['accuracy']) <= 1.0


@pytest.mark.slow
def test_grad_cache_over_four_micro_batches_equals_full_batch(setup):
  trainable, (ref_loss, ref_grads, _) = _reference(setup, 'softmax')
  config = small_config('softmax', micro_batches=4)
  grad_fn = jax.jit(train_step.make_grad_fn(config, setup['model'], setup['mesh']))
  placed = {'params': jax.device_put(trainable['params'], setup['shardings'].params),
            'loss_params': {}}
  loss_value, _, _, grads = grad_fn(placed, {}, setup['batch'])
  np.testing.assert_allclose(loss_value, ref_loss, rtol=1e-5, atol=1e-5)
  assert_trees_close(grads, ref_grads)
  with pytest.raises(ValueError, match=r'config\.train\.micro_batches'):
    jax.jit(train_step.make_grad_fn(small_config(micro_batches=3), setup['model'],
                                    setup['mesh'])).lower(placed, {}, setup['batch'])


def test_train_step_metrics_temperature_clip_and_donation(setup):
  config, mesh, shardings = setup['config'], setup['mesh'], setup['shardings']
  step = train_step.make_train_step(config, setup['model'], mesh, shardings)
  # Start above the cap: the update must bring the temperature back to <= 100.
  params = dict(setup['host'].params, logit_scale=np.float32(math.log(100.0) + 0.5))
  state = jax.device_put(setup['host'].replace(params=params), shardings)
  old = state
  state, metrics = step(state, setup['batch'])
  assert set(metrics) == {'loss', 'accuracy', 'temperature', 'grad_norm', 'learning_rate'}
  assert float(metrics['temperature']) <= 100.0 + 1e-4
  assert float(state.params['logit_scale']) == np.float32(math.log(100.0))   # clipped
  assert float(metrics['learning_rate']) == pytest.approx(1e-3)
  assert float(metrics['grad_norm']) > 0 and np.isfinite(float(metrics['loss']))
  assert int(state.step) == 1
  assert old.params['visual']['proj'].is_deleted()                    # donated
  assert state.params['visual']['proj'].sharding == shardings.params['visual']['proj']
  state, metrics = step(state, setup['batch'])
  assert int(state.step) == 2 and float(metrics['temperature']) <= 100.0 + 1e-4


def _small_resnet_setup(config):
  """(model, mesh, shardings, host state, device state, batch) for a small ResNet CLIP."""
  model = build_model(config.model)
  mesh = make_mesh((8, 1, 1))
  # Random host values instead of create_train_state: the init program of even a small
  # ResNet takes long to compile on CPU, and creation is tested above.
  abstract, shardings = train_step.train_state_shardings(config, model, mesh)
  rng = np.random.default_rng(0)
  host = abstract.replace(
      step=np.int32(0), opt_state=None,
      params=jax.tree_util.tree_map(
          lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), abstract.params),
      batch_stats=jax.tree_util.tree_map(
          lambda x: np.full(x.shape, 0.5, np.float32), abstract.batch_stats))
  assert host.batch_stats, 'the ResNet has BatchNorm statistics'
  opt_state = jax.jit(optim.make_optimizer(config).init,
                      out_shardings=shardings.opt_state)(host.trainable)
  state = jax.device_put(host.replace(opt_state=opt_state), shardings)
  return model, mesh, shardings, host, state, make_batch(config)


@pytest.mark.slow
def test_resnet_batch_stats_are_carried_through_the_step():
  config = small_config('softmax', vision='resnet')
  model, mesh, shardings, host, state, batch = _small_resnet_setup(config)

  @jax.jit
  def reference(variables):
    (image, text, scale), updates = model.apply(variables, batch['image'], batch['text'],
                                                train=True, mutable=['batch_stats'])
    return reference_loss('softmax', image, text, scale, 0.0), updates['batch_stats']
  ref_loss, ref_stats = reference({'params': host.params, 'batch_stats': host.batch_stats})
  step = train_step.make_train_step(config, model, mesh, shardings)
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics['loss'], ref_loss, rtol=1e-5, atol=1e-5)
  assert_trees_close(jax.device_get(new_state.batch_stats), ref_stats)
  assert not np.allclose(flatten_names(ref_stats)['visual/bn1/mean'],
                         flatten_names(host.batch_stats)['visual/bn1/mean'])


@pytest.mark.slow
def test_locked_resnet_tower_keeps_and_uses_its_running_statistics():
  """LiT with a ResNet image tower: frozen BatchNorm layers normalise with their running
  statistics (eval mode) and keep them; the text tower still trains."""
  config = small_config('softmax', vision='resnet')
  config.optim.freeze = (r'^params/visual/',)
  model, mesh, shardings, host, state, batch = _small_resnet_setup(config)

  @jax.jit
  def reference(variables):
    image, text, scale = model.apply(variables, batch['image'], batch['text'], train=False)
    return reference_loss('softmax', image, text, scale, 0.0)
  ref_loss = reference({'params': host.params, 'batch_stats': host.batch_stats})
  step = train_step.make_train_step(config, model, mesh, shardings)
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics['loss'], ref_loss, rtol=1e-5, atol=1e-5)
  new = jax.device_get(new_state)
  for name, value in flatten_names(new.batch_stats).items():
    np.testing.assert_array_equal(value, flatten_names(host.batch_stats)[name], err_msg=name)
  before, after = flatten_names(host.params), flatten_names(new.params)
  assert all(np.array_equal(after[n], before[n]) for n in before if n.startswith('visual/'))
  assert not np.array_equal(after['text/token_embedding'], before['text/token_embedding'])
