"""The base experiment config every file in `configs/` starts from, and its validation.

Configs are ml_collections ConfigDicts (big_vision style). `get_config(arch)` gives
every key with its default; `configs/<model>.py` changes what differs and documents
how to run it. Sections are built by one small function each so the defaults of a
subsystem sit in one place.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from clip_jax.models.architectures import canonical_name, model_config
from clip_jax.models.clip import validate_model_config


def _mesh_defaults() -> ml_collections.ConfigDict:
  # Axis sizes over (data, fsdp, model); -1 takes the devices that are left.
  return ml_collections.ConfigDict(dict(shape=(-1, 1, 1), axes=('data', 'fsdp', 'model')))


def get_config(arch: str = 'tiny', **model_overrides: Any) -> ml_collections.ConfigDict:
  """The full default config for architecture `arch` (see clip_jax.models.architectures)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(canonical_name(arch), **model_overrides)
  config.batch_size = 256            # global batch over all hosts and devices
  config.total_steps = 1000
  config.mesh = _mesh_defaults()
  return config


def _unknown_keys(config: Any, reference: Any, prefix: str) -> list[str]:
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    return []
  if not isinstance(reference, (ml_collections.ConfigDict, dict)):
    return []
  unknown = []
  for key in config.keys():
    if key not in reference:
      unknown.append(f'{prefix}{key}')
    else:
      unknown += _unknown_keys(config[key], reference[key], f'{prefix}{key}.')
  return unknown


# Sections whose keys depend on the chosen variant (they are not checked for unknown keys).
_FREE_FORM = ('model.vision', 'model.text')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first unknown or invalid key."""
  if 'model' not in config or 'name' not in config.model:
    raise ValueError('config.model.name: missing; expected an architecture name such as "ViT-B/32"')
  reference = get_config(config.model.name)
  unknown = [k for k in _unknown_keys(config, reference, '')
             if not any(k.startswith(f + '.') for f in _FREE_FORM)]
  if unknown:
    raise ValueError(f'config: unknown key(s) {", ".join("config." + k for k in unknown)}; '
                     'check the spelling against clip_jax/config.py')
  validate_model_config(config.model)
  if len(config.mesh.shape) != len(config.mesh.axes):
    raise ValueError(f'config.mesh.shape: {tuple(config.mesh.shape)} has {len(config.mesh.shape)} '
                     f'entries but config.mesh.axes names {len(config.mesh.axes)}')
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size: expected a positive integer, got {config.batch_size}')
