"""`clip_jax.load`: the first thing users reach for.

    model = clip_jax.load('ViT-B/32')            # architecture name: random init (seed)
    model = clip_jax.load('ViT-B-32.pt')         # or a clip_jax workdir, .safetensors, HF dir
    feats = model.encode_image(pixels)           # float32 [N, H, W, 3], CLIP-normalised
    feats = model.encode_text(token_ids)         # int32 [N, context]
    feats = model.encode_text(model.tokenizer(['a photo of a cat']))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clip_jax import storage
from clip_jax.models import build_model, init_variables, model_config
from clip_jax.models.architectures import (ARCHITECTURE_KEYS, ARCHITECTURES, CLIP_MEAN, CLIP_STD,
                                           ModelOptions, canonical_name)
from clip_jax.models.clip import CLIP, TowerEncoder


@dataclasses.dataclass
class ClipModel:
  """The one handle on a CLIP model: config, variables, module, tokenizer and preprocessing.

  `clip_jax.load` makes it; the evaluate and embed CLIs use the same handle with its
  variables on their mesh (`clip_jax.evaluate.loading.load_for_evaluation`). The module
  is built once, the encode functions are jitted once, the tokenizer is built on first use.
  """
  config: ml_collections.ConfigDict     # the model section (see clip_jax.models.architectures)
  variables: dict[str, Any]             # {'params': ..., maybe 'batch_stats': ...}
  experiment: ml_collections.ConfigDict | None = None   # the run's full config (a workdir)
  # What `tokenizer` builds: '' (the run's config.data.tokenizer, else the one the
  # vocabulary implies), 'clip_bpe' or a SentencePiece .model file.
  tokenizer_spec: str = ''
  module: CLIP = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    self.module = build_model(self.config)

  @property
  def params(self) -> dict[str, Any]:
    return self.variables['params']

  @property
  def image_size(self) -> int:
    return int(self.config.vision.image_size)

  @property
  def image_mean(self) -> tuple[float, float, float]:
    """RGB mean of [0, 1] pixels that encode_image expects subtracted (then / image_std)."""
    return CLIP_MEAN

  @property
  def image_std(self) -> tuple[float, float, float]:
    return CLIP_STD

  @property
  def context_length(self) -> int:
    return int(self.config.text.context_length)

  @functools.cached_property
  def tokenizer(self) -> Callable[[Sequence[str]], np.ndarray]:
    """texts -> int32 [N, context_length]; built on first use (images need none)."""
    from clip_jax.data.tokenizers import tokenizer_for  # pylint: disable=g-import-not-at-top
    run = self.experiment
    section = run.data.get('tokenizer') if run is not None and 'data' in run else None
    tokenizer = tokenizer_for(self.config, section, self.tokenizer_spec)
    if tokenizer is None:
      raise ValueError('--tokenizer: this model has no known tokenizer; pass clip_bpe or a '
                       'SentencePiece .model file')
    return tokenizer

  @functools.cached_property
  def _encode_image(self):
    return jax.jit(TowerEncoder(self.module, 'image'))

  @functools.cached_property
  def _encode_text(self):
    return jax.jit(TowerEncoder(self.module, 'text'))

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


def _with_overrides(cfg: ml_collections.ConfigDict, path: str,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The stored model config with option overrides; the weights fix the architecture."""
  bad = sorted((set(overrides) & set(ARCHITECTURE_KEYS)) | (set(overrides) - set(cfg)))
  if bad:
    raise ValueError(f'clip_jax.load({path!r}): cannot override {bad}; the weights fix the '
                     f'architecture. Options that can be set: '
                     f'{sorted(set(cfg) - set(ARCHITECTURE_KEYS))}')
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.update(overrides)
  return cfg


def _loaded(stored: ml_collections.ConfigDict, variables: dict[str, Any], path: str,
            model_overrides: dict[str, Any], experiment: ml_collections.ConfigDict | None,
            tokenizer: str) -> ClipModel:
  """The handle on stored weights, in the layer layout (scanned or not) the options ask for."""
  from clip_jax.convert.mapping import set_layer_layout  # pylint: disable=g-import-not-at-top
  cfg = _with_overrides(stored, path, model_overrides)
  variables = set_layer_layout(variables, ModelOptions.from_config(cfg).scan_layers)
  return ClipModel(cfg, variables, experiment, tokenizer)


def load_workdir(workdir: str | os.PathLike, *, tokenizer: str = '', **model_overrides: Any
                 ) -> ClipModel:
  """A ClipModel from a clip_jax workdir: its latest checkpoint and its experiment config."""
  # Imported lazily: plain name loading needs neither orbax nor the converter.
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  experiment, variables = checkpoint.load_model(workdir)
  return _loaded(experiment.model, variables, os.fspath(workdir), model_overrides, experiment,
                 tokenizer)


def _load_path(path: str, model_overrides: dict[str, Any], tokenizer: str) -> ClipModel:
  """A ClipModel from a clip_jax workdir, a PyTorch weight file or a HF CLIPModel directory."""
  from clip_jax import convert  # pylint: disable=g-import-not-at-top
  from clip_jax.convert.hf_layout import is_hf_directory  # pylint: disable=g-import-not-at-top
  if storage.is_dir(path) and not is_hf_directory(path):
    return load_workdir(path, tokenizer=tokenizer, **model_overrides)
  imported = convert.load_source(path)
  return _loaded(imported.config, imported.variables, path, model_overrides, None, tokenizer)


def load(name_or_path: str | os.PathLike, *, seed: int = 0, tokenizer: str = '',
         **model_overrides: Any) -> ClipModel:
  """A ClipModel from an architecture name (random init with `seed`) or a path.

  A path (relative to the current directory, absolute, or a `gs://` URL) may be a
  clip_jax workdir (the latest checkpoint, via
  `clip_jax.checkpoint.load_model`), an OpenAI/open_clip weight file (`.pt`, `.pth`,
  `.bin`, `.safetensors`, or OpenAI's TorchScript archives, read without running
  their code) or a Hugging Face CLIPModel directory; see `clip_jax.convert`. An
  existing path wins over an architecture name.

  `model_overrides` set model options that leave the weights' shapes unchanged,
  e.g. `dtype='bfloat16'`, `attention_impl='cudnn'`, `scan_layers=True`. `tokenizer`
  is what `model.tokenizer` builds ('' = the workdir's, else the vocabulary's).
  """
  text = os.fspath(name_or_path)
  if storage.is_url(text) or storage.exists(text):
    return _load_path(str(storage.resolve(text)), model_overrides, tokenizer)
  try:
    name = canonical_name(text)
  except ValueError:
    raise ValueError(f'clip_jax.load: {name_or_path!r} is neither a known architecture '
                     f'({", ".join(ARCHITECTURES)}) nor a file or directory that can be '
                     'loaded') from None
  cfg = model_config(name, **model_overrides)
  variables = jax.jit(lambda rng: init_variables(build_model(cfg), cfg, rng))(
      jax.random.key(seed))
  return ClipModel(cfg, variables, tokenizer_spec=tokenizer)
