"""Feature extraction on the device mesh: sharded batches, a padded last batch, all hosts.

Every host feeds its own slice of each global batch; the encoder runs under `jax.jit`
with the batch split over the data-parallel mesh axes, and the features come back
replicated so each host sees the whole global batch in global order. Padded rows carry
`mask=False` and are dropped, so every sample is counted exactly once whatever the
batch size and the number of devices or hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.sharding import batch_sharding, data_parallel_size, replicated

# encode_fn(variables, inputs) -> features [B, E]; traced under jit.
EncodeFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TowerEncoder:
  """`encode_fn` for one tower of a CLIP module; hashable so compiled code is reused."""
  model: CLIP
  tower: str    # 'image' or 'text'

  def __call__(self, variables: Any, inputs: jax.Array) -> jax.Array:
    if self.tower == 'image':
      return self.model.apply(variables, inputs, method=CLIP.encode_image)
    if self.tower == 'text':
      return self.model.apply(variables, inputs, method=CLIP.encode_text)
    raise ValueError(f"TowerEncoder.tower: expected 'image' or 'text', got {self.tower!r}")


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


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every array to `size` rows with zeros; `mask` marks the real rows."""
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f'pad_batch: batch of {n} rows is larger than the batch size {size}')
  mask = np.asarray(batch['mask'], bool) if 'mask' in batch else np.ones(n, bool)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if len(value) != n:
      raise ValueError(f'pad_batch: {key!r} has {len(value)} rows, expected {n}')
    padding = np.zeros((size - n,) + value.shape[1:], value.dtype)
    out[key] = np.concatenate([value, padding])
  out['mask'] = np.concatenate([mask, np.zeros(size - n, bool)])
  return out


def host_batches(num_examples: int, global_batch_size: int, mesh: Mesh,
                 load_rows: Callable[[np.ndarray], Mapping[str, np.ndarray]]
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This host's padded batches over examples 0..num_examples-1 in global order.

  Global batch b covers examples [b*G, (b+1)*G); host p loads its contiguous part
  with `load_rows(indices)`. All hosts yield the same number of batches, which a
  collective program requires.
  """
  local = host_batch_size(global_batch_size, mesh)
  process = jax.process_index()
  empty = None      # zero rows of the right shapes, for a host whose slice is empty
  for start in range(0, num_examples, global_batch_size):
    lo = min(start + process * local, num_examples)
    hi = min(lo + local, num_examples)
    if hi > lo:
      rows = dict(load_rows(np.arange(lo, hi)))
    else:   # an all-padding batch; the shapes come from a row this host read, or row 0
      rows = empty if empty is not None else dict(load_rows(np.arange(0, 1)))
    empty = {k: np.asarray(v)[:0] for k, v in rows.items()}
    yield pad_batch(rows if hi > lo else empty, local)


def array_batches(arrays: Mapping[str, np.ndarray], global_batch_size: int, mesh: Mesh
                  ) -> Iterator[dict[str, np.ndarray]]:
  """`host_batches` over in-memory arrays that every host holds in full."""
  num = len(next(iter(arrays.values())))
  return host_batches(num, global_batch_size, mesh,
                      lambda idx: {k: np.asarray(v)[idx] for k, v in arrays.items()})


@functools.lru_cache(maxsize=32)
def _batch_encoder(encode_fn: EncodeFn, normalize: bool, mesh: Mesh
                   ) -> Callable[[Any, jax.Array], jax.Array]:
  """One compiled encoder per (encoder, mesh, input shape): periodic evaluations reuse it."""

  def encode(variables, inputs):
    features = encode_fn(variables, inputs).astype(jnp.float32)
    return l2_normalize(features) if normalize else features

  # Replicated output: every host reads the whole global batch, in global order.
  return jax.jit(encode, out_shardings=replicated(mesh))


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
  encode = _batch_encoder(encode_fn, normalize, mesh)
  chunks: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    batch = dict(batch)
    if 'mask' not in batch:
      raise ValueError(f"extract_features: batches need a boolean 'mask'; got keys {sorted(batch)}")
    inputs = np.asarray(batch.pop(input_key))
    global_inputs = jax.make_array_from_process_local_data(
        batch_sharding(mesh, inputs.ndim), inputs)
    features = np.asarray(encode(variables, global_inputs).addressable_data(0))
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
