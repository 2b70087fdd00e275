"""clip_jax.models.layers.attention (the CPU-friendly einsum path) equals JAX's reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.layers import attention


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_einsum_attention_matches_dot_product_attention(causal, dtype, tol):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (3, 7, 4, 16), dtype) for key in keys)
  ours = jax.jit(lambda q, k, v: attention(q, k, v, causal, 'xla'))
  reference = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation='xla'))
  assert ours(q, k, v).dtype == dtype
  np.testing.assert_allclose(np.asarray(ours(q, k, v), np.float32),
                             np.asarray(reference(q, k, v), np.float32), atol=tol, rtol=tol)
  # Gradients too: the train step differentiates through it.
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
  ours_grad = jax.jit(jax.grad(loss(lambda q, k, v: attention(q, k, v, causal, 'xla')),
                               argnums=(0, 1, 2)))(q, k, v)
  ref_grad = jax.jit(jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation='xla')), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(ours_grad, ref_grad):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=5 * tol, rtol=5 * tol)


def test_attention_with_fewer_queries_than_keys():
  """The ResNet attention pool: one query against every spatial token."""
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (2, 1, 4, 8))
  k, v = (jax.random.normal(key, (2, 10, 4, 8)) for key in keys[1:])
  ours = jax.jit(lambda q, k, v: attention(q, k, v, False, 'xla'))(q, k, v)
  reference = jax.nn.dot_product_attention(q, k, v, implementation='xla')
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)
