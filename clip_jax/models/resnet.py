"""OpenAI's ModifiedResNet image tower.

Differs from torchvision's ResNet in three ways (as in the paper): a 3-convolution
stem with an average pool instead of a max pool; anti-aliased strided blocks (an
average pool before the 1x1 expansion instead of a strided convolution); and a
multi-head attention pool instead of global average pooling. BatchNorm statistics
live in the `batch_stats` collection.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (REMAT_POLICIES, Dtype, attention, logical, normal,
                                    resample_positional_embedding)

_CONV_AXES = (None, None, 'conv_in', 'conv_out')


def _conv(features: int, kernel: int, dtype: Dtype, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=False,
                 dtype=dtype, name=name,
                 kernel_init=logical(nn.initializers.kaiming_normal(), _CONV_AXES))


def _batch_norm(train: bool, dtype: Dtype, name: str, zero_init: bool = False) -> nn.BatchNorm:
  # PyTorch momentum 0.1 is flax momentum 0.9; eps 1e-5 as PyTorch.
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name,
                      scale_init=logical(scale_init, ('norm',)),
                      bias_init=logical(nn.initializers.zeros, ('norm',)))


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
  planes: int
  stride: int
  dtype: Dtype
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_planes = self.planes * self.expansion
    out = nn.relu(_batch_norm(train, self.dtype, 'bn1')(_conv(self.planes, 1, self.dtype, 'conv1')(x)))
    out = nn.relu(_batch_norm(train, self.dtype, 'bn2')(_conv(self.planes, 3, self.dtype, 'conv2')(out)))
    out = _avg_pool(out, self.stride)
    # Zero-init the last gain so every block starts as the identity (OpenAI's init).
    out = _batch_norm(train, self.dtype, 'bn3', zero_init=True)(
        _conv(out_planes, 1, self.dtype, 'conv3')(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != out_planes:
      identity = _conv(out_planes, 1, self.dtype, 'downsample_conv')(_avg_pool(x, self.stride))
      identity = _batch_norm(train, self.dtype, 'downsample_bn')(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Attention pooling: the mean token queries all spatial tokens (one query)."""
  spatial_dim: int
  heads: int
  output_dim: int
  dtype: Dtype
  attention_impl: str | None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, rows, cols, channels = x.shape
    x = x.reshape(batch, -1, channels)                                   # [B, HW, C]
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)      # [B, HW+1, C]
    pos = self.param('positional_embedding', logical(normal(channels ** -0.5), (None, 'embed')),
                     (self.spatial_dim ** 2 + 1, channels))
    # Another image size (a CLIPA stage): the stored grid resampled, as the ViT's.
    grid = (self.spatial_dim, self.spatial_dim)
    x = x + resample_positional_embedding(pos, grid, (rows, cols)).astype(x.dtype)
    std = channels ** -0.5

    def dense(features, name, in_axis, out_axis):
      return nn.Dense(features, dtype=self.dtype, name=name,
                      kernel_init=logical(normal(std), (in_axis, out_axis)),
                      bias_init=logical(nn.initializers.zeros, (out_axis,)))

    # The q/k/v outputs and c_proj's input are (heads, head_dim) merged heads-major, so
    # they carry the logical axis 'heads': a tensor-parallel split of it splits the heads.
    head_dim = channels // self.heads
    split = lambda t: t.reshape(batch, t.shape[1], self.heads, head_dim)
    q = split(dense(channels, 'q_proj', 'embed', 'heads')(x[:, :1]))
    k = split(dense(channels, 'k_proj', 'embed', 'heads')(x))
    v = split(dense(channels, 'v_proj', 'embed', 'heads')(x))
    out = attention(q, k, v, causal=False, impl=self.attention_impl)
    out = out.reshape(batch, channels)
    return dense(self.output_dim, 'c_proj', 'heads', 'proj')(out)


def refuse_masking(mask_ratio: float) -> None:
  """Patch masking (FLIP) drops ViT tokens; a convolutional tower has none to drop."""
  if mask_ratio:
    raise ValueError(f'config.model.vision.mask_ratio: {mask_ratio} drops patch tokens, '
                     "which only a ViT has; vision.type='resnet' (the ModifiedResNet) takes 0")


class ModifiedResNet(nn.Module):
  image_size: int
  layers: Sequence[int]
  width: int
  heads: int
  output_dim: int
  # Model options (clip_jax.models.architectures.ModelOptions), all set by build_model.
  dtype: Dtype
  remat_policy: str
  attention_impl: str | None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, mask_ratio: float = 0.0
               ) -> jax.Array:
    """images: float [B, H, W, 3], CLIP-normalised. Returns unnormalised [B, output_dim].

    `mask_ratio` is the ViT's patch masking: anything but 0 is refused.
    """
    refuse_masking(mask_ratio)
    x = images.astype(self.dtype)
    half = self.width // 2
    # 3-convolution stem; the first is strided.
    x = nn.Conv(half, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                dtype=self.dtype, name='conv1',
                kernel_init=logical(nn.initializers.kaiming_normal(), _CONV_AXES))(x)
    x = nn.relu(_batch_norm(train, self.dtype, 'bn1')(x))
    x = nn.relu(_batch_norm(train, self.dtype, 'bn2')(_conv(half, 3, self.dtype, 'conv2')(x)))
    x = nn.relu(_batch_norm(train, self.dtype, 'bn3')(_conv(self.width, 3, self.dtype, 'conv3')(x)))
    x = _avg_pool(x, 2)

    block_cls = Bottleneck
    if self.remat_policy != 'none':
      block_cls = nn.remat(Bottleneck, policy=REMAT_POLICIES[self.remat_policy],
                           static_argnums=(2,))
    for stage, num_blocks in enumerate(self.layers):
      planes = self.width * 2 ** stage
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = block_cls(planes, stride, self.dtype, name=f'layer{stage + 1}_{i}')(x, train)

    return AttentionPool2d(self.image_size // 32, self.heads, self.output_dim, self.dtype,
                           self.attention_impl, name='attnpool')(x).astype(jnp.float32)
