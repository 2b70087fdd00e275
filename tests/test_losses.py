"""The distributed losses against plain single-device formulas, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.models.clip import l2_normalize
from clip_jax.sharding import make_mesh

GLOBAL_BATCH, DIM = 32, 16
LOSSES = ('softmax', 'sigmoid', 'ring')


def reference_loss(name, x, y, logit_scale, bias):
  """The losses as written in the papers, on the whole batch at once."""
  logits = jnp.exp(logit_scale) * x @ y.T
  if name == 'sigmoid':
    signs = 2 * jnp.eye(x.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * (logits + bias))) / x.shape[0]
  image_nll = jax.nn.logsumexp(logits, axis=1) - jnp.diag(logits)
  text_nll = jax.nn.logsumexp(logits, axis=0) - jnp.diag(logits)
  return (image_nll.mean() + text_nll.mean()) / 2


def reference_accuracy(x, y):
  logits = x @ y.T
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
  # The ring is the all-gather softmax loss, computed another way.
  np.testing.assert_allclose(out['ring'][0], out['softmax'][0], rtol=1e-6)
  for g_ring, g_gather in zip(out['ring'][1], out['softmax'][1]):
    np.testing.assert_allclose(g_ring, g_gather, rtol=1e-5, atol=1e-6)


def test_loss_params_and_bad_name():
  sigmoid = ml_collections.ConfigDict(dict(name='sigmoid', sigmoid_bias_init=-10.0))
  assert float(losses.init_loss_params(sigmoid)['bias']) == -10.0
  assert losses.init_loss_params(ml_collections.ConfigDict(dict(name='ring'))) == {}
  with pytest.raises(ValueError, match=r'config\.loss\.name.*hinge'):
    losses.make_loss(ml_collections.ConfigDict(dict(name='hinge')), make_mesh((8, 1, 1)))
