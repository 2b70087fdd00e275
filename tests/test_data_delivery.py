"""Host batches -> global arrays on the 8-device mesh, and the background prefetcher."""

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax.data import delivery
from clip_jax.sharding import batch_sharding, make_mesh


def host_batch(step: int, batch_size: int = 16) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(step)
  return {'image': rng.normal(size=(batch_size, 4, 4, 3)).astype(np.float32),
          'text': rng.integers(0, 100, (batch_size, 5)).astype(np.int32),
          'label': np.arange(batch_size, dtype=np.int32) + step}


class CountingSource:
  """A stateful host iterator like TrainIterator: state_dict and num_skipped per batch."""

  def __init__(self, num_batches: int, fail_at: int | None = None):
    self.step, self.num_batches, self.fail_at = 0, num_batches, fail_at
    self.thread_names = set()

  def __iter__(self):
    return self

  def __next__(self):
    self.thread_names.add(threading.current_thread().name)
    if self.step == self.fail_at:
      raise ValueError('planted failure')
    if self.step == self.num_batches:
      raise StopIteration
    self.step += 1
    return host_batch(self.step)

  @property
  def num_skipped(self):
    return 3 * self.step

  def state_dict(self):
    return {'step': self.step}


def test_to_global_places_the_batch_on_the_data_axes():
  mesh = make_mesh((4, 2, 1))
  batch = host_batch(0)
  for sharding in (mesh, NamedSharding(mesh, P(('data', 'fsdp')))):
    arrays = delivery.to_global(batch, sharding)
    for key, value in batch.items():
      assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
      np.testing.assert_array_equal(np.asarray(arrays[key]), value)
      assert arrays[key].sharding.is_equivalent_to(batch_sharding(mesh, value.ndim), value.ndim)
      # Each of the 8 devices holds 2 of the 16 rows.
      assert {s.data.shape[0] for s in arrays[key].addressable_shards} == {2}
  per_key = {k: NamedSharding(mesh, P()) for k in batch}
  assert delivery.to_global(batch, per_key)['text'].sharding.is_fully_replicated
  with pytest.raises(KeyError, match="no sharding given for batch key 'label'"):
    delivery.to_global(batch, {'image': per_key['image'], 'text': per_key['text']})
  # A global batch the data axes do not divide is refused by jax with the shapes.
  with pytest.raises(ValueError):
    delivery.to_global({'x': np.zeros((6, 2))}, mesh)


def test_prefetch_runs_ahead_but_reports_the_consumed_position():
  mesh = make_mesh((-1, 1, 1))
  source = CountingSource(num_batches=6)
  prefetcher = delivery.prefetch_to_mesh(source, mesh, size=2)
  assert prefetcher.state_dict() == {'step': 0}
  first = next(prefetcher)
  time.sleep(0.5)                               # let the thread fill its queue
  assert source.step >= 3                       # one returned + two waiting (+ one in hand)
  assert prefetcher.state_dict() == {'step': 1} and prefetcher.num_skipped == 3
  assert isinstance(first['image'], jax.Array)
  np.testing.assert_array_equal(np.asarray(first['label']), host_batch(1)['label'])
  rest = list(prefetcher)
  assert [int(b['label'][0]) for b in rest] == [2, 3, 4, 5, 6]
  assert prefetcher.state_dict() == {'step': 6} and prefetcher.num_skipped == 18
  assert source.thread_names == {'prefetch_to_mesh'}
  with pytest.raises(StopIteration):
    next(prefetcher)


def test_prefetch_reraises_source_errors_and_closes():
  prefetcher = delivery.prefetch_to_mesh(CountingSource(10, fail_at=2), make_mesh(), size=1)
  next(prefetcher), next(prefetcher)
  with pytest.raises(ValueError, match='planted failure'):
    next(prefetcher)
  endless = delivery.prefetch_to_mesh(CountingSource(10**6), make_mesh(), size=1)
  next(endless)
  endless.close()
  assert not endless._thread.is_alive()
  with pytest.raises(ValueError, match='size must be >= 1'):
    delivery.prefetch_to_mesh(iter([]), make_mesh(), size=0)
  with pytest.raises(TypeError, match='has no state_dict'):
    delivery.prefetch_to_mesh(iter([host_batch(0)]), make_mesh()).state_dict()
