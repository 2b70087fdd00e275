"""Host batches -> global jax.Arrays on the mesh, with a background prefetch. No tensorflow.

Each host produces its slice of the global batch (numpy); `to_global` assembles the
global arrays with `jax.make_array_from_process_local_data`, so the train step sees
one `[global_batch, ...]` array per key, split over the data-parallel mesh axes.
`prefetch_to_mesh` overlaps that transfer (and the host pipeline) with the step.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clip_jax.sharding import MeshLayout, batch_sharding

ShardingLike = NamedSharding | MeshLayout | Mesh | Mapping[str, NamedSharding]


def _sharding_for(sharding: ShardingLike, key: str, ndim: int) -> NamedSharding:
  if isinstance(sharding, (MeshLayout, Mesh)):
    return batch_sharding(sharding, ndim)
  if isinstance(sharding, Mapping):
    if key not in sharding:
      raise KeyError(f'to_global: no sharding given for batch key {key!r} '
                     f'(have {", ".join(sharding)})')
    return sharding[key]
  return sharding


def to_global(batch: Mapping[str, np.ndarray], sharding: ShardingLike) -> dict[str, jax.Array]:
  """This host's batch slice -> global arrays.

  `sharding` is one NamedSharding for every key (its spec splits the leading axis;
  trailing axes are replicated), a MeshLayout or a Mesh (the batch sharding of
  clip_jax.sharding), or a dict key -> NamedSharding.
  """
  return {key: jax.make_array_from_process_local_data(
      _sharding_for(sharding, key, np.ndim(value)), np.asarray(value))
          for key, value in batch.items()}


class MeshPrefetcher:
  """Iterator of global batches produced `size` ahead by a background thread.

  If the wrapped iterator has `state_dict()` (and `num_skipped`), the prefetcher
  records them with each batch, so `state_dict()` here is the position right after
  the batch last returned by `next()`, not after the batches waiting in the queue.
  """

  _END = object()

  def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], sharding: ShardingLike,
               size: int = 2):
    if size < 1:
      raise ValueError(f'prefetch_to_mesh: size must be >= 1, got {size}')
    self._iterator = iterator
    self._sharding = sharding
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._state = self._source_state()
    self._num_skipped = getattr(iterator, 'num_skipped', 0)
    self._finished = False
    self._thread = threading.Thread(target=self._produce, name='prefetch_to_mesh', daemon=True)
    self._thread.start()

  def _source_state(self) -> dict[str, Any] | None:
    state_dict = getattr(self._iterator, 'state_dict', None)
    return state_dict() if callable(state_dict) else None

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          batch = next(self._iterator)
        except StopIteration:
          break
        item = (to_global(batch, self._sharding), self._source_state(),
                getattr(self._iterator, 'num_skipped', 0))
        if not self._put(item):
          return
    except BaseException as error:  # pylint: disable=broad-except  (re-raised in next())
      self._put(error)
      return
    self._put(self._END)

  def __iter__(self) -> 'MeshPrefetcher':
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if item is self._END:
      self._finished = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._finished = True
      raise item
    batch, self._state, self._num_skipped = item
    return batch

  @property
  def num_skipped(self) -> int:
    """Samples the source skipped (corrupt, empty caption) up to the last batch returned."""
    return int(self._num_skipped)

  def state_dict(self) -> dict[str, Any]:
    """The source position after the last batch returned (restore the source with it)."""
    if self._state is None:
      raise TypeError(f'prefetch_to_mesh: the wrapped {type(self._iterator).__name__} has no '
                      'state_dict(); use an iterator from clip_jax.data.pipeline')
    return self._state

  def close(self) -> None:
    """Stops the background thread (it exits after the batch it is working on), then the
    wrapped iterator if it can be closed (TrainIterator: its tf.data readers)."""
    self._stop.set()
    self._thread.join(timeout=10)
    close = getattr(self._iterator, 'close', None)
    if callable(close):
      close()

  def __del__(self):
    stop = getattr(self, '_stop', None)   # absent when __init__ refused its arguments
    if stop is not None:
      stop.set()


_STATE_BYTES = 4096


def all_host_states(state: Mapping[str, Any]) -> dict[str, Any]:
  """Every host's data-iterator state as `{'hosts': {'<process index>': state}}`.

  Each host reads its own files, so each has its own position; a checkpoint needs all
  of them. A collective when there are several processes: call it on every host (e.g.
  where the checkpoint is saved). `TrainIterator.restore` picks its own entry.
  """
  if jax.process_count() == 1:
    return {'hosts': {str(jax.process_index()): dict(state)}}
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  encoded = json.dumps(dict(state)).encode('utf-8')
  if len(encoded) > _STATE_BYTES:
    raise ValueError(f'all_host_states: state of {len(encoded)} bytes exceeds {_STATE_BYTES}')
  row = np.zeros(_STATE_BYTES, np.uint8)
  row[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(row))
  return {'hosts': {str(i): json.loads(bytes(r).rstrip(b'\0').decode('utf-8'))
                    for i, r in enumerate(rows)}}


def prefetch_to_mesh(iterator: Iterator[Mapping[str, np.ndarray]], sharding: ShardingLike,
                     size: int = 2) -> MeshPrefetcher:
  """Global batches from host batches, `size` of them prepared ahead in a background thread."""
  return MeshPrefetcher(iterator, sharding, size)
