"""Checks that run before step 1: what would otherwise fail after hours of training.

Each check raises ValueError (or OSError for storage) naming the config key or path
and what was expected. `run_checks` runs them all, in the order a run would hit them:
mesh, batch sizes, checkpoint intervals, workdir, training data, tokenizer, evaluation
data. `python -m clip_jax.main --dry_run` runs them and stops there.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from clip_jax import sharding, storage


def check_mesh(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """config.mesh.shape against the devices there are (one -1 takes the rest)."""
  devices = jax.device_count() if device_count is None else device_count
  sharding.resolve_mesh_shape(config.mesh.shape, devices)


def check_batch_sizes(config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh | sharding.MeshLayout) -> None:
  """The train and eval global batches split evenly over the batch-carrying devices."""
  layout = sharding.as_layout(mesh, config.mesh)
  parallel, shape = layout.data_parallel_size, dict(layout.mesh.shape)
  per_step = config.batch_size // config.train.micro_batches
  if per_step % parallel:
    raise ValueError(f'config.batch_size: {config.batch_size} (/ config.train.micro_batches='
                     f'{config.train.micro_batches}) is not a multiple of the {parallel} devices '
                     f'that carry the batch (mesh {shape}, batch axes {layout.batch_axes})')
  if config.eval.batch_size % parallel:
    raise ValueError(f'config.eval.batch_size: {config.eval.batch_size} is not a multiple of '
                     f'the {parallel} devices that carry the batch (mesh {shape}); '
                     f'e.g. {math.ceil(config.eval.batch_size / parallel) * parallel}')


def check_intervals(config: ml_collections.ConfigDict) -> list[str]:
  """Checkpoint and evaluation intervals that can never fire as meant; returns notes."""
  every, keep_every = config.checkpoint.every_steps, config.checkpoint.keep_every
  if keep_every and keep_every % every:
    raise ValueError(f'config.checkpoint.keep_every: {keep_every} is not a multiple of '
                     f'config.checkpoint.every_steps={every}, so no checkpoint would be kept')
  if keep_every > config.total_steps:
    raise ValueError(f'config.checkpoint.keep_every: {keep_every} is beyond '
                     f'config.total_steps={config.total_steps}: no checkpoint would be kept')
  if config.eval.every_steps > config.total_steps:
    raise ValueError(f'config.eval.every_steps: {config.eval.every_steps} is beyond '
                     f'config.total_steps={config.total_steps}; 0 evaluates only at the end')
  notes = []
  if every >= config.total_steps:
    notes.append(f'checkpoints: config.checkpoint.every_steps={every} >= config.total_steps='
                 f'{config.total_steps}: only the last step is saved')
  return notes


def check_workdir_writable(workdir: storage.PathLike) -> None:
  """Writes and removes a small file, so a read-only bucket fails now, not at the first save."""
  probe = storage.join(workdir, f'.write_check.{uuid.uuid4().hex[:8]}')
  try:
    storage.write_text(probe, 'clip_jax write check\n')
    probe.unlink()
  except OSError as error:
    raise OSError(f'--workdir {workdir}: not writable ({error})') from error


def check_train_data(config: ml_collections.ConfigDict) -> None:
  """config.data.train: files present, a first decodable record under the configured keys."""
  from clip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  pipeline.check_train_source(config)


def check_eval_data(config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh | sharding.MeshLayout,
                    tokenizer: Callable[..., np.ndarray] | None) -> None:
  """Every dataset config.eval names: present, and its first examples decodable."""
  from clip_jax.evaluate import datasets, run  # pylint: disable=import-outside-toplevel
  section, layout = config.eval, sharding.as_layout(mesh, config.mesh)
  wanted = [('zeroshot', spec, section.split) for spec in run.dataset_specs(section.zeroshot)]
  wanted += [('retrieval', spec, section.split) for spec in run.dataset_specs(section.retrieval)]
  for spec in run.dataset_specs(section.linear_probe):
    wanted += [('linear_probe', spec, section.split), ('linear_probe', spec, section.train_split)]
  for task, spec, split in wanted:
    key = f'config.eval.{task}'
    try:
      datasets.check_readable(spec, split=split, image_size=config.model.vision.image_size,
                              data_dir=section.data_dir or None, mesh=layout,
                              batch_size=section.batch_size, tokenizer=tokenizer)
    except (ValueError, OSError) as error:
      raise ValueError(f'{key}: dataset {spec!r} (split {split!r}): {error}') from error


def run_checks(config: ml_collections.ConfigDict, workdir: storage.PathLike,
               mesh: jax.sharding.Mesh | sharding.MeshLayout, tokenizer: Any,
               check_tokenizer: Callable[[Any, Any], None]) -> list[str]:
  """All checks, in order; returns notes worth printing (nothing wrong, but surprising)."""
  check_batch_sizes(config, mesh)
  notes = check_intervals(config)
  check_workdir_writable(workdir)
  check_tokenizer(config, tokenizer)
  check_train_data(config)
  check_eval_data(config, mesh, tokenizer)
  return notes
