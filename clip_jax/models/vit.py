"""Vision Transformer image tower in OpenAI's layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import Dtype, Transformer, layer_norm, logical, normal


class VisionTransformer(nn.Module):
  """Patch conv (no bias) -> [class; patches] + pos -> ln_pre -> blocks -> ln_post(class) -> proj."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_impl: str | None = 'xla'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: float [B, H, W, 3], CLIP-normalised. Returns unnormalised [B, output_dim]."""
    del train  # no batch statistics or dropout in the ViT tower
    scale = self.width ** -0.5
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding='VALID', use_bias=False, dtype=self.dtype, name='conv1',
                kernel_init=logical(nn.initializers.lecun_normal(),
                                    (None, None, None, 'embed')))(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)                       # [B, grid*grid, width]
    cls = self.param('class_embedding', logical(normal(scale), ('embed',)), (self.width,))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    num_tokens = (self.image_size // self.patch_size) ** 2 + 1
    pos = self.param('positional_embedding', logical(normal(scale), (None, 'embed')),
                     (num_tokens, self.width))
    x = x + pos.astype(x.dtype)
    x = layer_norm(self.dtype, 'ln_pre')(x)
    x = Transformer(self.layers, self.heads, causal=False, activation=self.activation,
                    dtype=self.dtype, remat_policy=self.remat_policy,
                    scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                    name='transformer')(x)
    x = layer_norm(self.dtype, 'ln_post')(x[:, 0])
    proj = self.param('proj', logical(normal(scale), ('embed', 'proj')),
                      (self.width, self.output_dim))
    return jnp.dot(x, proj.astype(x.dtype)).astype(jnp.float32)
