"""`clip_jax.load`: the first thing users reach for.

    model = clip_jax.load('ViT-B/32')            # architecture name: random init (seed)
    feats = model.encode_image(pixels)           # float32 [N, H, W, 3], CLIP-normalised
    feats = model.encode_text(token_ids)         # int32 [N, context]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

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


def load(name_or_path: str, *, seed: int = 0, **model_overrides: Any) -> ClipModel:
  """A ClipModel from an architecture name (random init with `seed`).

  `model_overrides` set model options that leave the weights' shapes unchanged,
  e.g. `dtype='bfloat16'`, `attention_impl='cudnn'`.
  """
  try:
    name = canonical_name(name_or_path)
  except ValueError:
    raise ValueError(f'clip_jax.load: {name_or_path!r} is neither a known architecture '
                     f'({", ".join(ARCHITECTURES)}) nor a file or directory that can be '
                     'loaded') from None
  cfg = model_config(name, **model_overrides)
  variables = jax.jit(lambda rng: init_variables(build_model(cfg), cfg, rng))(
      jax.random.key(seed))
  return ClipModel(cfg, variables)
