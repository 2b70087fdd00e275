"""Vision Transformer image tower in OpenAI's layout, with FLIP patch masking and
positional embeddings resampled to the input's patch grid."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (Dtype, Transformer, TransformerTower, layer_norm, logical,
                                    normal, resample_positional_embedding, take_positions)


MASK_RNG = 'mask'      # the flax RNG stream the patch masks are drawn from (FLIP)


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


def valid_mask_ratio(mask_ratio: object) -> bool:
  """A masking ratio is a number in [0, 1): 1 would drop every patch."""
  return (isinstance(mask_ratio, (int, float)) and not isinstance(mask_ratio, bool)
          and 0 <= mask_ratio < 1)


def kept_patches(num_patches: int, mask_ratio: float) -> int:
  """How many of `num_patches` patch tokens a ViT keeps at `mask_ratio` (static, >= 1).

  round((1 - mask_ratio) * num_patches), Python's rounding (half to even); `flops.py`
  counts the encoder's tokens with this too.
  """
  if not valid_mask_ratio(mask_ratio):
    raise ValueError(f'mask_ratio: expected a fraction in [0, 1), got {mask_ratio!r}')
  return max(1, round((1 - mask_ratio) * num_patches))


def random_keep_indices(rng: jax.Array, batch: int, num_patches: int, keep: int) -> jax.Array:
  """int32 [batch, keep]: per example, `keep` distinct patch indices drawn uniformly, in
  increasing order (the kept tokens keep their image order).

  FLIP's draw: argsort of uniform noise is a random permutation per row. Each row is
  computed from its own noise, so a batch-sharded gather needs no other device's data.
  """
  noise = jax.random.uniform(rng, (batch, num_patches))
  return jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1).astype(jnp.int32)


class VisionTransformer(TransformerTower):
  """Patch conv (no bias) -> [class; patches] + pos -> ln_pre -> blocks -> ln_post(class) -> proj."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, mask_ratio: float = 0.0
               ) -> jax.Array:
    """images: float [B, H, W, 3], CLIP-normalised. Returns unnormalised [B, output_dim].

    H and W may differ from `image_size` (a CLIPA low-resolution stage): the positional
    embedding is resampled to the (H/P, W/P) grid; the stored parameter keeps its shape.
    `mask_ratio` (a static Python float; FLIP): each example keeps a random
    `kept_patches(...)` of its patch tokens, drawn from the 'mask' RNG, and the encoder
    runs on [class; kept] only. 0 runs every token and needs no RNG.
    """
    del train  # no batch statistics or dropout in the ViT tower
    rows, cols = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
    if not rows or not cols:
      raise ValueError(f'VisionTransformer: images of shape {tuple(images.shape)} are smaller '
                       f'than one {self.patch_size}-pixel patch')
    scale = self.width ** -0.5
    x = PatchEmbedding(self.patch_size, self.width, self.dtype, name='conv1')(images)
    batch = x.shape[0]                                         # x: [B, rows*cols, width]
    cls = self.param('class_embedding', logical(normal(scale), ('embed',)), (self.width,))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    grid = self.image_size // self.patch_size
    pos = self.param('positional_embedding', logical(normal(scale), (None, 'embed')),
                     (grid * grid + 1, self.width))
    x = x + resample_positional_embedding(pos, (grid, grid), (rows, cols)).astype(x.dtype)
    if mask_ratio != 0:
      keep = kept_patches(rows * cols, mask_ratio)            # checks the ratio
      kept = random_keep_indices(self.make_rng(MASK_RNG), batch, rows * cols, keep)
      # Token 0 is the class token (always kept); patch i is token i + 1.
      positions = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), kept + 1], axis=1)
      x = take_positions(x, positions)                         # [B, 1 + keep, width]
    x = layer_norm(self.dtype, 'ln_pre')(x)
    x = Transformer(self.layers, self.heads, causal=False, activation=self.activation,
                    dtype=self.dtype, remat_policy=self.remat_policy,
                    scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                    name='transformer')(x, jnp.zeros((batch,), jnp.int32))  # class token
    x = layer_norm(self.dtype, 'ln_post')(x)
    proj = self.param('proj', logical(normal(scale), ('embed', 'proj')),
                      (self.width, self.output_dim))
    return jnp.dot(x, proj.astype(x.dtype)).astype(jnp.float32)
