"""Vision Transformer image tower in OpenAI's layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import Dtype, Transformer, TransformerTower, layer_norm, logical, normal


class PatchEmbedding(nn.Module):
  """Non-overlapping patches times a kernel: OpenAI's stride-P PxP conv, computed as one matmul.

  The kernel keeps the conv's HWIO shape [P, P, 3, width] (and the name `conv1`), so
  checkpoints and converters see a conv; the computation cuts the image into patches
  (row-major over (dy, dx, channel), the kernel's own order) and multiplies by the
  kernel seen as [P*P*3, width]. On CPU XLA runs this ~2.4x faster than its conv for the
  same FLOPs (ViT-B/32 forward at batch 8: 118 -> 50 ms); the result is the same up to
  float rounding.
  """
  patch_size: int
  width: int
  dtype: Dtype

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> patch embeddings [B, (H/P)*(W/P), width]."""
    batch, height, width_px, channels = images.shape
    p = self.patch_size
    kernel = self.param('kernel', logical(nn.initializers.lecun_normal(),
                                          (None, None, None, 'embed')),
                        (p, p, channels, self.width))
    rows, cols = height // p, width_px // p
    patches = images[:, :rows * p, :cols * p].reshape(batch, rows, p, cols, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, p * p * channels)
    return jnp.dot(patches.astype(self.dtype),
                   kernel.reshape(p * p * channels, self.width).astype(self.dtype))


class VisionTransformer(TransformerTower):
  """Patch conv (no bias) -> [class; patches] + pos -> ln_pre -> blocks -> ln_post(class) -> proj."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: float [B, H, W, 3], CLIP-normalised. Returns unnormalised [B, output_dim]."""
    del train  # no batch statistics or dropout in the ViT tower
    scale = self.width ** -0.5
    x = PatchEmbedding(self.patch_size, self.width, self.dtype, name='conv1')(images)
    batch = x.shape[0]                                         # x: [B, grid*grid, width]
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
                    name='transformer')(x, jnp.zeros((batch,), jnp.int32))  # class token
    x = layer_norm(self.dtype, 'ln_post')(x)
    proj = self.param('proj', logical(normal(scale), ('embed', 'proj')),
                      (self.width, self.output_dim))
    return jnp.dot(x, proj.astype(x.dtype)).astype(jnp.float32)
