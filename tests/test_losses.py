"""The distributed losses against plain single-device formulas, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import losses, train_step
from clip_jax.models.clip import build_model, l2_normalize
from clip_jax.sharding import batch_sharding, make_mesh, replicated

GLOBAL_BATCH, DIM = 32, 16
LOSSES = ('softmax', 'sigmoid', 'ring', 'ring_sigmoid')


def reference_loss(name, x, y, logit_scale, bias):
  """The losses as written in the papers, on the whole batch at once."""
  logits = jnp.exp(logit_scale) * x @ y.T
  if name in losses.SIGMOID_LOSSES:
    signs = 2 * jnp.eye(x.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * (logits + bias))) / x.shape[0]
  image_nll = jax.nn.logsumexp(logits, axis=1) - jnp.diag(logits)
  text_nll = jax.nn.logsumexp(logits, axis=0) - jnp.diag(logits)
  return (image_nll.mean() + text_nll.mean()) / 2


def reference_accuracy(x, y):
  """In-batch retrieval both ways, np.argmax's first-index ties. Every pair is summed
  the same way (not by BLAS, whose kernels differ across columns), so equal rows tie."""
  logits = np.sum(x[:, None, :].astype(np.float64) * y[None, :, :], axis=-1)
  labels = np.arange(x.shape[0])
  return ((np.argmax(logits, 1) == labels).mean() + (np.argmax(logits, 0) == labels).mean()) / 2


def _inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = l2_normalize(jax.random.normal(k1, (GLOBAL_BATCH, DIM)))
  # Texts correlated with the images so that accuracy is neither 0 nor 1.
  y = l2_normalize(x + 0.8 * jax.random.normal(k2, (GLOBAL_BATCH, DIM)))
  return x, y, jnp.float32(2.3), jnp.float32(-4.0)


def _all_losses(mesh):
  fns = {n: losses.make_loss(ml_collections.ConfigDict(dict(name=n, sigmoid_bias_init=-10.0)),
                             mesh) for n in LOSSES}

  def run(x, y, logit_scale, bias):
    out = {}
    for name, fn in fns.items():
      value_and_grad = jax.value_and_grad(
          lambda *a, fn=fn: fn(a[0], a[1], a[2], {'bias': a[3]}), argnums=(0, 1, 2, 3),
          has_aux=True)
      (value, metrics), grads = value_and_grad(x, y, logit_scale, bias)
      out[name] = (value, grads, metrics['accuracy'])
    return out
  return jax.jit(run)


@pytest.fixture(scope='module')
def reference():
  x, y, scale, bias = _inputs()
  run = jax.jit(lambda *a: {n: jax.value_and_grad(lambda *b, n=n: reference_loss(n, *b),
                                                  argnums=(0, 1, 2, 3))(*a) for n in LOSSES})
  return run(x, y, scale, bias)


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_losses_equal_single_device(mesh_shape, reference):
  x, y, scale, bias = _inputs()
  out = _all_losses(make_mesh(mesh_shape))(x, y, scale, bias)
  accuracy = reference_accuracy(np.asarray(x), np.asarray(y))
  assert 0 < accuracy < 1
  for name in LOSSES:
    value, grads, acc = out[name]
    ref_value, ref_grads = reference[name]
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5, err_msg=name)
    for arg, g, rg in zip(('image', 'text', 'logit_scale', 'bias'), grads, ref_grads):
      np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5, err_msg=f'{name} d/d{arg}')
    assert float(acc) == pytest.approx(accuracy), name
  # The rings are the all-gather losses, computed another way.
  for ring, gather in (('ring', 'softmax'), ('ring_sigmoid', 'sigmoid')):
    np.testing.assert_allclose(out[ring][0], out[gather][0], rtol=1e-6, err_msg=ring)
    for g_ring, g_gather in zip(out[ring][1], out[gather][1]):
      np.testing.assert_allclose(g_ring, g_gather, rtol=1e-5, atol=1e-6, err_msg=ring)
    assert float(out[ring][2]) == float(out[gather][2]), ring
  assert float(jnp.abs(out['ring_sigmoid'][1][3])) > 1e-3    # the bias is learnt


def test_ring_accuracy_ranks_ties_as_argmax():
  """Duplicated rows (a repeated caption) make exact ties across blocks: like the
  gathered losses' jnp.argmax, the rings credit the first of the tied columns, whatever
  order the blocks pass the device in."""
  x, y, scale, bias = _inputs()
  half = GLOBAL_BATCH // 2
  x, y = jnp.concatenate([x[:half], x[:half]]), jnp.concatenate([y[:half], y[:half]])
  accuracy = reference_accuracy(np.asarray(x), np.asarray(y))
  assert 0 < accuracy <= 0.5                       # the second copies never win a tie
  for shape in ((8, 1, 1), (2, 2, 2)):
    out = _all_losses(make_mesh(shape))(x, y, scale, bias)
    for name in LOSSES:
      assert float(out[name][2]) == pytest.approx(accuracy), (shape, name)


def _loss_temp_bytes(name, mesh, batch, dim):
  """XLA's per-device temporary memory for the loss's value and gradients."""
  config = ml_collections.ConfigDict(dict(name=name, sigmoid_bias_init=-10.0))
  loss = losses.make_loss(config, mesh)
  fn = jax.jit(jax.grad(lambda x, y, s, p: loss(x, y, s, p)[0], argnums=(0, 1, 2, 3)))
  features = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sharding(mesh, 2))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(mesh))
  params = jax.tree.map(lambda _: scalar, losses.init_loss_params(config))
  return fn.lower(features, features, scalar, params).compile().memory_analysis(
      ).temp_size_in_bytes


def test_ring_losses_never_hold_a_global_logit_matrix():
  """Compiled, not run: at 256 rows per device the ring losses need less temporary
  memory than one [B_local, B_global] float32 logit matrix, which every gathered loss
  has to hold. (They hold about 3 of their 8 blocks; jax.grad of the ring's fori_loop
  without the custom VJPs saves every block, 3.6x the matrix.)"""
  mesh, local, dim = make_mesh((8, 1, 1)), 256, 8
  logit_matrix = local * 8 * local * 4
  for name in ('ring', 'ring_sigmoid'):
    assert _loss_temp_bytes(name, mesh, 8 * local, dim) < logit_matrix * 3 / 4, name
  assert _loss_temp_bytes('sigmoid', mesh, 8 * local, dim) >= logit_matrix


def test_loss_params_and_bad_name():
  sigmoid = ml_collections.ConfigDict(dict(name='sigmoid', sigmoid_bias_init=-10.0))
  assert float(losses.init_loss_params(sigmoid)['bias']) == -10.0
  ring_sigmoid = ml_collections.ConfigDict(dict(name='ring_sigmoid', sigmoid_bias_init=-2.5))
  assert float(losses.init_loss_params(ring_sigmoid)['bias']) == -2.5
  assert losses.init_loss_params(ml_collections.ConfigDict(dict(name='ring'))) == {}
  with pytest.raises(ValueError, match=r'config\.loss\.name.*hinge'):
    losses.make_loss(ml_collections.ConfigDict(dict(name='hinge')), make_mesh((8, 1, 1)))


@pytest.mark.slow
def test_a_ring_sigmoid_train_step_equals_a_sigmoid_one():
  """One optimizer step of the tiny model on a (2, 4, 1) mesh, FSDP parameters: the
  ring changes how the loss is computed, not the step."""
  # Imported here: test_train_step imports reference_loss from this module.
  from test_train_step import assert_trees_close, make_batch, small_config
  configs = {name: small_config(name) for name in ('sigmoid', 'ring_sigmoid')}
  for config in configs.values():
    config.loss.sigmoid_bias_init = -3.0
  model = build_model(configs['sigmoid'].model)
  mesh = make_mesh((2, 4, 1))
  state, shardings = train_step.create_train_state(configs['sigmoid'], model, mesh,
                                                   jax.random.key(0))
  host = jax.device_get(state)
  batch = make_batch(configs['sigmoid'])
  results = {}
  for name, config in configs.items():
    step = train_step.make_train_step(config, model, mesh, shardings)
    new, metrics = step(jax.device_put(host, shardings), batch)
    results[name] = jax.device_get((new, metrics))
  (ring_state, ring_metrics), (state, metrics) = results['ring_sigmoid'], results['sigmoid']
  for key in ('loss', 'grad_norm', 'accuracy', 'temperature'):
    np.testing.assert_allclose(ring_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
  assert_trees_close(ring_state.params, state.params)
  assert_trees_close(ring_state.loss_params, state.loss_params)
  assert float(state.loss_params['bias']) != -3.0                 # the bias moved
