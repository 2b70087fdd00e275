"""Device mesh and the shardings of batches (parameter rules are added beside these).

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded), `model` (tensor parallel). A batch is split
over `data` and `fsdp` together: both are data-parallel axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the one -1 entry by what is left of `num_devices`; checks the product."""
  shape = tuple(int(s) for s in shape)
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f'config.mesh.shape: at most one -1 allowed, got {shape}')
  known = int(np.prod([s for s in shape if s != -1]))
  if known <= 0 or num_devices % known:
    raise ValueError(f'config.mesh.shape: {shape} does not divide the {num_devices} devices')
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f'config.mesh.shape: {shape} uses {int(np.prod(shape))} devices but '
                     f'{num_devices} are present; use -1 for "the rest"')
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices of all hosts (or `devices`), laid out for fast collectives."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, tuple(axes), devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
