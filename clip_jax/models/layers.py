"""Building blocks shared by both towers: activations, MLP, attention, the residual block.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that
`clip_jax.sharding` can place it by rule; the model itself knows nothing of meshes.
Logical names used here:
  embed      model width                     mlp        MLP hidden width
  heads      attention heads                 head_dim   per-head width
  qkv        the stacked q/k/v axis          vocab      token vocabulary
  proj       joint embedding width           norm       LayerNorm/BatchNorm gains and biases
  layers     stacked (scanned) layers        conv_in / conv_out   ResNet channels
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': quick_gelu,
    # PyTorch's nn.GELU default is the exact erf form; match it.
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
}

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attn_out': jax.checkpoint_policies.save_only_these_names('attn_out'),
}


def logical(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
  return nn.with_logical_partitioning(init, names)


def normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with eps 1e-5 (PyTorch's); flax keeps its statistics in float32."""
  return nn.LayerNorm(
      epsilon=1e-5, dtype=dtype, name=name,
      scale_init=logical(nn.initializers.ones, ('norm',)),
      bias_init=logical(nn.initializers.zeros, ('norm',)))


class MLP(nn.Module):
  """c_fc -> activation -> c_proj, as OpenAI's `mlp`."""
  width: int
  hidden: int
  activation: str
  fc_std: float
  proj_std: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, name='c_fc',
                 kernel_init=logical(normal(self.fc_std), ('embed', 'mlp')),
                 bias_init=logical(nn.initializers.zeros, ('mlp',)))(x)
    x = ACTIVATIONS[self.activation](x)
    return nn.Dense(self.width, dtype=self.dtype, name='c_proj',
                    kernel_init=logical(normal(self.proj_std), ('mlp', 'embed')),
                    bias_init=logical(nn.initializers.zeros, ('embed',)))(x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, impl: str | None,
              query_positions: jax.Array | None = None) -> jax.Array:
  """Multi-head attention of [B, T, heads, head_dim] inputs (keys may have S != T).

  impl 'xla' is the plain einsum -> float32 softmax -> einsum, which XLA compiles well
  on every backend: `jax.nn.dot_product_attention`'s own 'xla' path reshapes for
  grouped-query attention, and its extra batch axis costs 14-30% more CPU time per
  forward+backward at ViT-B/32's shapes (BENCHMARKS.md, 'Optimisations'). Any other impl
  ('cudnn', or None to let JAX choose) calls `jax.nn.dot_product_attention`.

  query_positions: int [B, T], the sequence position of each query when the queries are
  a subset of the keys' positions (the final-layer shortcut of `Transformer`); a causal
  query then sees the keys at or before its own position. Always the einsum path.
  """
  if impl != 'xla' and query_positions is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
  logits = jnp.einsum('bthd,bshd->bhts', q, k,
                      preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
  logits = logits * q.shape[-1] ** -0.5
  if causal:
    if query_positions is None:
      visible = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    else:
      visible = (jnp.arange(k.shape[1])[None, None, None, :]
                 <= query_positions[:, None, :, None])           # [B, 1, T, S]
    logits = jnp.where(visible, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhts,bshd->bthd', weights, v)


def take_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x [B, T, ...] at per-example positions [B, K] -> [B, K, ...]."""
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class _Weights(nn.Module):
  """A kernel and a bias under one name, for layers that compute with them themselves."""
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_shape: tuple[int, ...]
  bias_axes: tuple[str, ...]
  std: float

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', logical(normal(self.std), self.kernel_axes), self.kernel_shape)
    bias = self.param('bias', logical(nn.initializers.zeros, self.bias_axes), self.bias_shape)
    return kernel, bias


class TransformerTower(nn.Module):
  """The model options a transformer tower (image or text) takes, all set by build_model
  from clip_jax.models.architectures.ModelOptions."""
  activation: str
  dtype: Dtype
  remat_policy: str
  scan_layers: bool
  attention_impl: str | None


class MultiHeadAttention(nn.Module):
  """Self-attention with one fused q/k/v projection.

  The q/k/v kernel is [width, 3, heads, head_dim] (PyTorch's `in_proj_weight`, with a
  heads axis that tensor parallelism can split) and the output kernel [heads, head_dim,
  width]; (heads, head_dim) are multiplied as one axis (a free reshape), which XLA:CPU
  runs without the relayout copies and slower backward that the multi-axis contraction of
  `nn.DenseGeneral` cost (BENCHMARKS.md, 'Optimisations').

  With `query_positions` only those positions are queried (keys and values still come
  from every token): the output is [B, K, width] for int positions [B, K].
  """
  heads: int
  causal: bool
  in_std: float
  out_std: float
  dtype: Dtype = jnp.float32
  attention_impl: str | None = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, query_positions: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv_kernel, qkv_bias = _Weights(
        (width, 3, self.heads, head_dim), ('embed', 'qkv', 'heads', 'head_dim'),
        (3, self.heads, head_dim), ('qkv', 'heads', 'head_dim'), self.in_std, name='qkv')()
    out_kernel, out_bias = _Weights(
        (self.heads, head_dim, width), ('heads', 'head_dim', 'embed'),
        (width,), ('embed',), self.out_std, name='out')()
    x = x.astype(self.dtype)
    # (heads, head_dim) merge into one axis with heads major, so a tensor-parallel split of
    # the heads stays a contiguous split of that axis (merging the q/k/v axis too would
    # make XLA's partitioner all-gather the kernel).
    qkv_kernel = qkv_kernel.astype(self.dtype).reshape(width, 3, width)
    qkv_bias = qkv_bias.astype(self.dtype).reshape(3, width)
    project = lambda y, kernel, bias: jnp.einsum('btc,cxf->btxf', y, kernel) + bias
    split = lambda y: y.reshape(y.shape[:3] + (self.heads, head_dim))
    if query_positions is None:
      qkv = split(project(x, qkv_kernel, qkv_bias))           # [B, T, 3, heads, head_dim]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      kv = split(project(x, qkv_kernel[:, 1:], qkv_bias[1:]))
      k, v = kv[:, :, 0], kv[:, :, 1]
      q = split(project(take_positions(x, query_positions), qkv_kernel[:, :1], qkv_bias[:1]))
      q = q[:, :, 0]
    out = attention(q, k, v, self.causal, self.attention_impl, query_positions)
    out = checkpoint_name(out, 'attn_out')
    out = out.reshape(out.shape[:2] + (width,))
    return (jnp.dot(out, out_kernel.astype(self.dtype).reshape(width, width))
            + out_bias.astype(self.dtype))


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  Takes and returns a (carry, None) pair so the same module runs under nn.scan.
  """
  heads: int
  causal: bool
  activation: str
  num_layers: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  attention_impl: str | None = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, _: Any = None, query_positions: jax.Array | None = None
               ) -> tuple[jax.Array, None]:
    """x [B, T, width] -> [B, T, width]; with query_positions [B, K]: [B, K, width]."""
    width = x.shape[-1]
    # OpenAI's initialisation (CLIP.initialize_parameters).
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * self.num_layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    y = layer_norm(self.dtype, 'ln_1')(x)
    attn = MultiHeadAttention(self.heads, self.causal, attn_std, proj_std, self.dtype,
                              self.attention_impl, name='attn')(y, query_positions)
    if query_positions is not None:
      x = take_positions(x, query_positions)
    x = x + attn
    y = layer_norm(self.dtype, 'ln_2')(x)
    x = x + MLP(width, width * self.mlp_ratio, self.activation, fc_std, proj_std,
                self.dtype, name='mlp')(y)
    return x, None


class Transformer(nn.Module):
  """A stack of residual attention blocks, unrolled or under nn.scan, with optional remat."""
  layers: int
  heads: int
  causal: bool
  activation: str
  dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_impl: str | None = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, final_positions: jax.Array | None = None) -> jax.Array:
    """x [B, T, width] -> [B, T, width], or [B, width] at `final_positions` (int [B]).

    With final_positions, the unrolled stack runs its last block for those tokens only
    (the class token, the end-of-text token): their outputs are the same, and the last
    block's MLP, output projection and queries are skipped for every other token, about
    5/6 of one layer's FLOPs. The scanned stack runs every layer whole (its blocks share
    one traced body) and picks the tokens after.
    """
    block_cls = ResidualAttentionBlock
    if self.remat_policy != 'none':
      # prevent_cse is only needed outside scan (scan already blocks CSE).
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy],
                           prevent_cse=not self.scan_layers)
    kwargs = dict(heads=self.heads, causal=self.causal, activation=self.activation,
                  num_layers=self.layers, dtype=self.dtype,
                  attention_impl=self.attention_impl)
    if self.scan_layers:
      stack = nn.scan(block_cls, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      length=self.layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**kwargs, name='resblocks')(x, None)
      return x if final_positions is None else take_positions(x, final_positions[:, None])[:, 0]
    for i in range(self.layers):
      last = i == self.layers - 1 and final_positions is not None
      x, _ = block_cls(**kwargs, name=f'resblocks_{i}')(
          x, None, final_positions[:, None] if last else None)
    return x if final_positions is None else x[:, 0]


def resample_positional_embedding(pos: jax.Array, grid: tuple[int, int],
                                  new_grid: tuple[int, int]) -> jax.Array:
  """[1 + rows*cols, width] positional embedding for a `new_grid` of patches.

  The class token's row is kept; the patch rows, seen as a [rows, cols, width] image, are
  resampled bicubically in float32 as timm's `resample_abs_pos_embed` and open_clip's
  `resize_pos_embed` do by default (torch `F.interpolate(mode='bicubic',
  align_corners=False, antialias=True)`: Keys' a = -0.5 kernel, widened when
  downsampling, weights renormalised at the borders), which `jax.image.resize` with
  antialias computes. The same grid returns `pos` itself (the model's plain computation).
  """
  if tuple(new_grid) == tuple(grid):
    return pos
  width = pos.shape[-1]
  patches = pos[1:].astype(jnp.float32).reshape(*grid, width)
  patches = jax.image.resize(patches, (*new_grid, width), method='bicubic', antialias=True)
  return jnp.concatenate([pos[:1], patches.reshape(-1, width).astype(pos.dtype)], axis=0)
