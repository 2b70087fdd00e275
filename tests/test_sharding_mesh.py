"""Mesh construction from config shapes."""

import jax
import pytest

from clip_jax.sharding import batch_sharding, data_parallel_size, make_mesh, resolve_mesh_shape


def test_resolve_mesh_shape():
  assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r'config\.mesh\.shape'):
    resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match=r'config\.mesh\.shape'):
    resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(ValueError, match=r'at most one -1'):
    resolve_mesh_shape((-1, -1, 1), 8)


def test_mesh_over_fake_devices():
  assert jax.device_count() == 8
  mesh = make_mesh((2, 4, 1))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'model': 1}
  assert data_parallel_size(mesh) == 8
  x = jax.device_put(jax.numpy.zeros((16, 3)), batch_sharding(mesh, 2))
  assert x.addressable_shards[0].data.shape == (2, 3)
