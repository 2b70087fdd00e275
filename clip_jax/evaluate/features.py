"""Feature extraction on the device mesh: sharded batches, a padded last batch, all hosts.

Every host feeds its own slice of each global batch (the split of
`clip_jax.data.eval_input`); the encoder runs under `jax.jit` with the batch split over
the data-parallel mesh axes, and every host gathers the features of the whole global
batch in global order. Padded rows carry `mask=False` and are dropped, so every sample
is counted exactly once whatever the batch size and the number of devices or hosts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clip_jax.data.eval_input import LoadRows, split_batches
from clip_jax.models.clip import TowerEncoder, l2_normalize
from clip_jax.sharding import batch_sharding, data_parallel_size

# encode_fn(variables, inputs) -> features [B, E]; traced under jit.
EncodeFn = Callable[[Any, jax.Array], jax.Array]


def host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This host's share of a global batch; checks the global batch fits the mesh."""
  dp = data_parallel_size(mesh)
  if global_batch_size <= 0 or global_batch_size % dp:
    raise ValueError(f'eval batch size {global_batch_size} must be a positive multiple of the '
                     f'{dp} data-parallel devices of the mesh')
  return global_batch_size // jax.process_count()


def fit_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the data-parallel devices (for the CLIs, whose
  default must work on any device count)."""
  dp = data_parallel_size(mesh)
  return max(dp, -(-int(batch_size) // dp) * dp)


def host_batches(num_examples: int, global_batch_size: int, mesh: Mesh, load_rows: LoadRows
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This host's padded batches over examples 0..num_examples-1 in global order.

  The split is `clip_jax.data.eval_input`'s (host p loads the p-th contiguous part of
  each global batch with `load_rows(indices)`); all hosts yield the same number of
  batches, which a collective program requires.
  """
  return split_batches(num_examples, host_batch_size(global_batch_size, mesh), load_rows,
                       jax.process_index(), jax.process_count())


def array_batches(arrays: Mapping[str, np.ndarray], global_batch_size: int, mesh: Mesh
                  ) -> Iterator[dict[str, np.ndarray]]:
  """`host_batches` over in-memory arrays that every host holds in full."""
  num = len(next(iter(arrays.values())))
  return host_batches(num, global_batch_size, mesh,
                      lambda idx: {k: np.asarray(v)[idx] for k, v in arrays.items()})


@functools.partial(jax.jit, static_argnames=('encode_fn', 'normalize'))
def _encode(variables: Any, inputs: jax.Array, encode_fn: EncodeFn, normalize: bool) -> jax.Array:
  """Features of one global batch, batch-sharded like `inputs`.

  Jitted once here: jax's jit cache keeps one program per (encoder, input shape and
  sharding), so periodic evaluations reuse it, and nothing of ours holds a mesh.
  """
  features = encode_fn(variables, inputs).astype(jnp.float32)
  return l2_normalize(features) if normalize else features


def _global_rows(features: jax.Array) -> np.ndarray:
  """All rows of a global array on every host, in global order."""
  if features.is_fully_addressable:
    return np.asarray(features)
  from jax.experimental import multihost_utils   # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(features, tiled=True))


def _gather_hosts(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Host-local rows of all hosts, concatenated in process order (the global batch order)."""
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in local.items()}
  from jax.experimental import multihost_utils   # pylint: disable=import-outside-toplevel
  return {k: np.asarray(v) for k, v in
          multihost_utils.process_allgather(dict(local), tiled=True).items()}


def extract_features(encode_fn: EncodeFn, variables: Any,
                     batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, *,
                     input_key: str = 'image', normalize: bool = True) -> dict[str, np.ndarray]:
  """Encodes `batches[input_key]` on the mesh; returns 'features' and the other keys.

  `batches` yields this host's equally sized, padded batches with a `mask` (see
  `host_batches`); the result holds the unmasked rows of all hosts in global order,
  with every other key of the batch (labels, ids) carried along row by row. Only the
  input goes through the compiled encoder, so extra keys never cause a recompile.
  """
  chunks: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    batch = dict(batch)
    if 'mask' not in batch:
      raise ValueError(f"extract_features: batches need a boolean 'mask'; got keys {sorted(batch)}")
    inputs = np.asarray(batch.pop(input_key))
    global_inputs = jax.make_array_from_process_local_data(
        batch_sharding(mesh, inputs.ndim), inputs)
    features = _global_rows(_encode(variables, global_inputs, encode_fn, normalize))
    out = _gather_hosts(batch)
    keep = out.pop('mask').astype(bool)
    out['features'] = features
    for key, value in out.items():
      chunks.setdefault(key, []).append(value[keep])
  if not chunks:
    raise ValueError('extract_features: the dataset yielded no batches')
  return {k: np.concatenate(v) for k, v in chunks.items()}


def encode_arrays(encode_fn: EncodeFn, variables: Any, inputs: np.ndarray, mesh: Mesh,
                  global_batch_size: int, *, normalize: bool = True) -> np.ndarray:
  """Features of in-memory inputs (e.g. token ids), in order; any row count."""
  batches = array_batches({'inputs': np.asarray(inputs)}, global_batch_size, mesh)
  return extract_features(encode_fn, variables, batches, mesh, input_key='inputs',
                          normalize=normalize)['features']
