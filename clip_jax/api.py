"""`clip_jax.load`: the first thing users reach for.

    model = clip_jax.load('ViT-B/32')            # architecture name: random init (seed)
    model = clip_jax.load('ViT-B-32.pt')         # or a clip_jax workdir, .safetensors, HF dir
    feats = model.encode_image(pixels)           # float32 [N, H, W, 3], CLIP-normalised
    feats = model.encode_text(token_ids)         # int32 [N, context]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from clip_jax import storage
from clip_jax.models import build_model, init_variables, model_config
from clip_jax.models.architectures import ARCHITECTURES, canonical_name
from clip_jax.models.clip import CLIP


@dataclasses.dataclass
class ClipModel:
  """A CLIP model with its config and variables; encode functions are jitted once."""
  config: ml_collections.ConfigDict     # the model section (see clip_jax.models.architectures)
  variables: dict[str, Any]             # {'params': ..., maybe 'batch_stats': ...}

  def __post_init__(self):
    self.module: CLIP = build_model(self.config)

  @property
  def params(self) -> dict[str, Any]:
    return self.variables['params']

  @property
  def image_size(self) -> int:
    return int(self.config.vision.image_size)

  @property
  def context_length(self) -> int:
    return int(self.config.text.context_length)

  @functools.cached_property
  def _encode_image(self):
    return jax.jit(lambda v, x: self.module.apply(v, x, method=CLIP.encode_image))

  @functools.cached_property
  def _encode_text(self):
    return jax.jit(lambda v, t: self.module.apply(v, t, method=CLIP.encode_text))

  def encode_image(self, pixels: Any) -> jax.Array:
    """Unnormalised image features [N, embed_dim] from CLIP-normalised NHWC pixels."""
    pixels = jnp.asarray(pixels, jnp.float32)
    want = (self.image_size, self.image_size, 3)
    if pixels.ndim != 4 or pixels.shape[1:] != want:
      raise ValueError(f'encode_image: expected pixels of shape [N, {want[0]}, {want[1]}, 3] '
                       f'(NHWC, CLIP-normalised), got {tuple(pixels.shape)}')
    return self._encode_image(self.variables, pixels)

  def encode_text(self, tokens: Any) -> jax.Array:
    """Unnormalised text features [N, embed_dim] from int32 token ids [N, context]."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
      raise ValueError(f'encode_text: expected token ids of shape [N, <= {self.context_length}], '
                       f'got {tuple(tokens.shape)}')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'encode_text: expected integer token ids, got {tokens.dtype}')
    return self._encode_text(self.variables, tokens.astype(jnp.int32))


_SHAPE_KEYS = ('name', 'embed_dim', 'vision', 'text')


def _with_overrides(cfg: ml_collections.ConfigDict, path: str,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The stored model config with option overrides; the weights fix the architecture."""
  bad = sorted((set(overrides) & set(_SHAPE_KEYS)) | (set(overrides) - set(cfg)))
  if bad:
    raise ValueError(f'clip_jax.load({path!r}): cannot override {bad}; the weights fix the '
                     f'architecture. Options that can be set: '
                     f'{sorted(set(cfg) - set(_SHAPE_KEYS))}')
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.update(overrides)
  return cfg


def _load_path(path: str, model_overrides: dict[str, Any]) -> ClipModel:
  """A ClipModel from a clip_jax workdir, a PyTorch weight file or a HF CLIPModel directory."""
  # Imported lazily: plain name loading needs neither orbax nor the converter.
  from clip_jax import checkpoint, convert  # pylint: disable=g-import-not-at-top
  from clip_jax.convert.hf_layout import is_hf_directory  # pylint: disable=g-import-not-at-top
  from clip_jax.convert.mapping import set_layer_layout  # pylint: disable=g-import-not-at-top
  if storage.is_dir(path) and not is_hf_directory(path):
    experiment, variables = checkpoint.load_model(path)
    cfg = _with_overrides(experiment.model, path, model_overrides)
  else:
    imported = convert.load_source(path)
    cfg = _with_overrides(imported.config, path, model_overrides)
    variables = imported.variables
  return ClipModel(cfg, set_layer_layout(variables, bool(cfg.get('scan_layers', False))))


def load(name_or_path: str | os.PathLike, *, seed: int = 0, **model_overrides: Any
         ) -> ClipModel:
  """A ClipModel from an architecture name (random init with `seed`) or a path.

  A path (relative to the current directory, absolute, or a `gs://` URL) may be a
  clip_jax workdir (the latest checkpoint, via
  `clip_jax.checkpoint.load_model`), an OpenAI/open_clip weight file (`.pt`, `.pth`,
  `.bin`, `.safetensors`, or OpenAI's TorchScript archives, read without running
  their code) or a Hugging Face CLIPModel directory; see `clip_jax.convert`. An
  existing path wins over an architecture name.

  `model_overrides` set model options that leave the weights' shapes unchanged,
  e.g. `dtype='bfloat16'`, `attention_impl='cudnn'`, `scan_layers=True`.
  """
  text = os.fspath(name_or_path)
  if storage.is_url(text) or storage.exists(text):
    return _load_path(str(storage.resolve(text)), model_overrides)
  try:
    name = canonical_name(text)
  except ValueError:
    raise ValueError(f'clip_jax.load: {name_or_path!r} is neither a known architecture '
                     f'({", ".join(ARCHITECTURES)}) nor a file or directory that can be '
                     'loaded') from None
  cfg = model_config(name, **model_overrides)
  variables = jax.jit(lambda rng: init_variables(build_model(cfg), cfg, rng))(
      jax.random.key(seed))
  return ClipModel(cfg, variables)
