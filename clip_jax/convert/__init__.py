"""PyTorch interop: OpenAI / open_clip / Hugging Face CLIP weights in, and back out.

    imported = load_source('ViT-B-32.pt')                    # or a .safetensors, or an HF dir
    imported.config, imported.variables                      # model config, clip_jax variables
    import_to_workdir('ViT-B-32.pt', 'runs/vit_b32')         # a clip_jax checkpoint + config
    export_workdir('runs/vit_b32', 'openai', 'out/model.safetensors')   # open_clip loads it
    export_workdir('runs/vit_b32', 'hf', 'out/hf')           # transformers.CLIPModel loads it

The architecture is read from the tensor shapes (`infer`); files are read without
running code from them (`safe_load`); the two layouts are `openai_layout` and
`hf_layout`, over the shared reshapes of `mapping`. What the clip_jax model does not
hold (BatchNorm `num_batches_tracked`, `attn_mask` buffers, each tensor's dtype and
the file's key order) is kept in `<workdir>/pytorch_source.safetensors`, so that
import -> export gives back the original tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from clip_jax import storage
from clip_jax.convert import hf_layout, infer, openai_layout
from clip_jax.convert.mapping import (KeyMismatchError, check_keys, expected_shapes,
                                      from_variables, to_variables, torch_shapes)
from clip_jax.convert.safe_load import (DTYPE_NAMES, CorruptFileError, UnsafeFileError,
                                        dtype_name, read_safetensors, read_state_dict,
                                        write_safetensors)
from clip_jax.models.architectures import model_config

LAYOUTS = ('openai', 'hf')
SOURCE_FILE = 'pytorch_source.safetensors'
OPEN_CLIP_CONFIG = 'open_clip_config.json'
OPEN_CLIP_WEIGHTS = 'open_clip_model.safetensors'
TORCH_SUFFIXES = ('.pt', '.pth', '.bin')

__all__ = ['CorruptFileError', 'Imported', 'KeyMismatchError', 'SourceInfo', 'UnsafeFileError',
           'export_hf', 'export_openai', 'export_workdir', 'import_state_dict',
           'import_to_workdir', 'load_source', 'read_source_info']


@dataclasses.dataclass
class SourceInfo:
  """What a PyTorch file held beyond the clip_jax variables (for bit-exact export)."""
  layout: str                                   # 'openai' or 'hf'
  source: str                                   # the file or directory it came from
  dtypes: dict[str, str]                        # key -> dtype name in the file
  key_order: list[str]                          # the file's keys, in order
  carried: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Imported:
  config: ml_collections.ConfigDict             # the model config (config.model)
  variables: dict[str, Any]                     # {'params', maybe 'batch_stats'}
  source: SourceInfo


def _layout_module(layout: str) -> Any:
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')
  return openai_layout if layout == 'openai' else hf_layout


def _weights_dtype(name: str | None) -> np.dtype | None:
  if name in (None, 'source'):
    return None
  if name not in ('float32', 'float16', 'bfloat16'):
    raise ValueError(f'--dtype: unknown {name!r}; expected float32, bfloat16 or float16')
  return DTYPE_NAMES[name]


def import_state_dict(state: Mapping[str, np.ndarray], *, layout: str = 'openai',
                      hf_config: Mapping[str, Any] | None = None, config: str | None = None,
                      activation: str | None = None, weights_dtype: str | None = 'float32',
                      source: str = '<state dict>', **model_options: Any) -> Imported:
  """clip_jax (model config, variables) from PyTorch tensors (numpy arrays).

  The architecture comes from the shapes (or, for `layout='hf'`, from `hf_config`),
  unless `config` names a zoo architecture, in which case the tensors must fit it.
  `activation` defaults to OpenAI's `quick_gelu` (open_clip models without
  '-quickgelu' in their name use 'gelu'; the shapes cannot tell). `weights_dtype`
  casts floating tensors (None keeps them as stored). `model_options` set other
  model options (`scan_layers`, `dtype`, ...).
  """
  module = _layout_module(layout)
  if layout == 'hf':
    if hf_config is None:
      raise ValueError(f'{source}: the Hugging Face layout needs its config.json')
    arch, options = infer.hf_architecture(hf_config, source)
  else:
    arch, options = infer.openai_architecture(state, source), {}
  if activation is not None:
    options['activation'] = activation
  options.update(model_options)
  if config is not None:
    cfg = model_config(config, **options)
    what = f'--config {cfg.name}'
  else:
    cfg = infer.build_config(arch, **options)
    what = f'the architecture read from its shapes ({cfg.name})'
  entries, shapes = module.entries(cfg), expected_shapes(cfg)
  check_keys(source, state, torch_shapes(entries, shapes), module.ignored, what)
  variables = to_variables(entries, state, cfg, shapes, _weights_dtype(weights_dtype))
  info = SourceInfo(
      layout=layout, source=source, dtypes={k: dtype_name(v.dtype) for k, v in state.items()},
      key_order=[k for k in state if not module.DROPPED.search(k)],
      carried={k: np.asarray(v) for k, v in state.items()
               if layout == 'openai' and openai_layout.CARRIED.search(k)})
  return Imported(cfg, jax.device_put(variables), info)


def load_source(path: str | os.PathLike, **kwargs: Any) -> Imported:
  """Imports a weight file (OpenAI layout) or a Hugging Face CLIPModel directory (local,
  relative to the current directory, or on a bucket)."""
  path = str(storage.resolve(path))
  if storage.is_dir(path):
    if not hf_layout.is_hf_directory(path):
      raise ValueError(f'{path}: a directory without a CLIPModel config.json; expected a '
                       'Hugging Face CLIPModel directory or a weight file')
    hf_config, state = hf_layout.read_directory(path)
    return import_state_dict(state, layout='hf', hf_config=hf_config, source=path, **kwargs)
  return import_state_dict(read_state_dict(path), layout='openai', source=path, **kwargs)


# --- the source record kept in a workdir -------------------------------------------------------

def write_source_info(workdir: str | os.PathLike, info: SourceInfo) -> str:
  path = str(storage.join(workdir, SOURCE_FILE))
  write_safetensors(path, info.carried, metadata={
      'layout': info.layout, 'source': info.source, 'dtypes': json.dumps(info.dtypes),
      'key_order': json.dumps(info.key_order)})
  return path


def read_source_info(workdir: str | os.PathLike) -> SourceInfo | None:
  """The record `import_to_workdir` left in a workdir, or None (a model trained here)."""
  path = str(storage.join(workdir, SOURCE_FILE))
  if not storage.exists(path):
    return None
  carried, meta = read_safetensors(path)
  try:
    return SourceInfo(layout=meta['layout'], source=meta['source'],
                      dtypes=json.loads(meta['dtypes']), key_order=json.loads(meta['key_order']),
                      carried={k: np.array(v) for k, v in carried.items()})
  except (KeyError, json.JSONDecodeError) as e:
    raise CorruptFileError(f'{path}: malformed converter record ({e!r}); remove it to export '
                           'without the original dtypes and buffers') from None


def import_to_workdir(source: str | os.PathLike, workdir: str | os.PathLike,
                      **kwargs: Any) -> Imported:
  """Imports `source` and writes a clip_jax checkpoint (step 0) and config into `workdir`."""
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from clip_jax.config import get_config  # pylint: disable=g-import-not-at-top
  imported = load_source(source, **kwargs)
  experiment = get_config(imported.config.name)
  experiment.model = imported.config
  checkpoint.save_model(workdir, experiment, imported.variables, step=0)
  write_source_info(workdir, imported.source)
  return imported


# --- export ----------------------------------------------------------------------------------

def _cast_for_export(tensors: Mapping[str, np.ndarray], dtype: str | None,
                     source: SourceInfo | None) -> dict[str, np.ndarray]:
  """Each tensor in `dtype`, or (dtype 'source'/None) in the dtype it was imported with."""
  target = _weights_dtype(dtype)
  out = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    if value.dtype.kind == 'f' or value.dtype.name == 'bfloat16':
      if target is not None:
        value = value.astype(target)
      elif source is not None and key in source.dtypes:
        value = value.astype(DTYPE_NAMES[source.dtypes[key]])
    out[key] = value
  return out


def _in_source_order(tensors: dict[str, np.ndarray], source: SourceInfo | None
                     ) -> dict[str, np.ndarray]:
  if source is None:
    return tensors
  ordered = {k: tensors[k] for k in source.key_order if k in tensors}
  ordered.update({k: v for k, v in tensors.items() if k not in ordered})
  return ordered


def _numpy_to_torch(value: np.ndarray) -> Any:
  import torch  # pylint: disable=g-import-not-at-top
  if value.dtype.name == 'bfloat16':
    return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.array(value))


def _write_weights(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  if path.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"{path}: writing a .pt file needs torch (pip install '.[torch]'); "
                        'write .safetensors instead') from None
    buffer = io.BytesIO()
    torch.save({k: _numpy_to_torch(v) for k, v in tensors.items()}, buffer)
    storage.write_bytes(path, buffer.getvalue())
  else:
    write_safetensors(path, tensors, metadata={'format': 'pt'})


def export_openai(cfg: ml_collections.ConfigDict, variables: Mapping[str, Any],
                  out: str | os.PathLike, dtype: str | None = 'source',
                  source: SourceInfo | None = None) -> list[str]:
  """Writes an OpenAI/open_clip state dict and `open_clip_config.json`; returns the paths.

  `out` ending in .safetensors, .pt, .pth or .bin names the weight file (the config
  goes beside it); anything else is a directory that gets `open_clip_model.safetensors`.
  """
  out = str(storage.resolve(out))
  weights = out if out.endswith(('.safetensors',) + TORCH_SUFFIXES) else \
      str(storage.join(out, OPEN_CLIP_WEIGHTS))
  if source is not None and source.layout != 'openai':
    source = dataclasses.replace(source, key_order=[], carried={})
  tensors = from_variables(openai_layout.entries(cfg), variables)
  tensors = openai_layout.with_buffers(tensors, source.carried if source else {})
  tensors = _cast_for_export(_in_source_order(tensors, source), dtype, source)
  _write_weights(weights, tensors)
  config_path = str(storage.resolve(weights).parent / OPEN_CLIP_CONFIG)
  storage.write_text(config_path, json.dumps({'model_cfg': infer.open_clip_model_cfg(cfg)},
                                             indent=2))
  return [weights, config_path]


def export_hf(cfg: ml_collections.ConfigDict, variables: Mapping[str, Any],
              out: str | os.PathLike, dtype: str | None = 'source',
              source: SourceInfo | None = None) -> list[str]:
  """Writes a Hugging Face CLIPModel directory (config.json + model.safetensors)."""
  out = str(storage.resolve(out))
  hf_layout.refuse_resnet(cfg, f'{out}')
  if source is not None and source.layout != 'hf':
    source = dataclasses.replace(source, key_order=[], carried={})
  tensors = from_variables(hf_layout.entries(cfg), variables)
  tensors = _cast_for_export(_in_source_order(tensors, source), dtype, source)
  weights = str(storage.join(out, hf_layout.WEIGHTS_FILE))
  write_safetensors(weights, tensors, metadata={'format': 'pt'})
  dtypes = {v.dtype.name for v in tensors.values() if v.dtype.kind == 'f' or
            v.dtype.name == 'bfloat16'}
  config_path = str(storage.join(out, hf_layout.CONFIG_FILE))
  storage.write_text(config_path, json.dumps(
      hf_layout.config_json(cfg, dtypes.pop() if len(dtypes) == 1 else 'float32'), indent=2))
  return [weights, config_path]


def export_workdir(workdir: str | os.PathLike, layout: str, out: str | os.PathLike,
                   dtype: str | None = 'source', step: int | None = None
                   ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Exports the latest (or `step`) checkpoint of a clip_jax workdir; (model config, paths)."""
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  _layout_module(layout)
  experiment, variables = checkpoint.load_model(workdir, step=step)
  cfg = experiment.model
  if layout == 'hf':
    hf_layout.refuse_resnet(cfg, os.fspath(out))
  exporter = export_openai if layout == 'openai' else export_hf
  return cfg, exporter(cfg, variables, out, dtype=dtype, source=read_source_info(workdir))
