"""Contrastive losses, exact for the global batch, distributed over the batch mesh axes.

Every loss takes L2-normalised features sharded over the batch axes of the mesh
(`MeshLayout.batch_axes`, by default `data` and `fsdp`; the other axes hold replicas)
and returns the loss of the WHOLE global batch, replicated, plus metrics. Inside
`jax.shard_map` each device sees its local rows only:

  softmax  (CLIP's loss) local rows against all-gathered columns; label of local row i
           is `shard_index * B_local + i`. Memory O(B_local x B_global). The all-gather's
           transpose (a reduce-scatter) makes the gradient the global loss's gradient.
  sigmoid  (SigLIP, Zhai et al. 2023) the same layout with the pairwise sigmoid loss
           -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), learnable bias `b`.
  ring     the softmax loss without gathering: text blocks travel around the ring of
           devices with `ppermute` while each device keeps an online log-sum-exp of its
           image rows, and the text block carries the online log-sum-exp of its own
           columns; a custom VJP recomputes the blocks in the backward pass, so memory is
           O(B_local^2) whatever the global batch.
  ring_sigmoid
           the sigmoid loss on the same ring: each device adds the terms of its image
           rows against each text block as it passes (positives in the home block only,
           negatives elsewhere); the sigmoid needs no normaliser, so nothing but the
           block's own ranking (for the accuracy) travels with it. The custom VJP
           recomputes the blocks and sends each block's gradient around with it, back
           home. Same bias (`loss_params`) as `sigmoid`; memory O(B_local^2).

`logit_scale` is the log temperature (the model's parameter); the logits are
`exp(logit_scale) * x . y`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from clip_jax.sharding import MeshLayout, as_layout

LOSSES = ('softmax', 'sigmoid', 'ring', 'ring_sigmoid')
SIGMOID_LOSSES = ('sigmoid', 'ring_sigmoid')   # the losses with SigLIP's learnable bias

LossFn = Callable[[jax.Array, jax.Array, jax.Array, Mapping[str, jax.Array]],
                  tuple[jax.Array, dict[str, jax.Array]]]


def init_loss_params(loss_config: Any) -> dict[str, jax.Array]:
  """Learnable parameters that belong to the loss, not the model (SigLIP's bias)."""
  if loss_config.name in SIGMOID_LOSSES:
    return {'bias': jnp.asarray(loss_config.sigmoid_bias_init, jnp.float32)}
  return {}


def _row_labels(axes: tuple[str, ...], local: int) -> jax.Array:
  """Global column index of each local row's positive pair."""
  return jax.lax.axis_index(axes) * local + jnp.arange(local)


def _softmax_body(x: jax.Array, y: jax.Array, logit_scale: jax.Array, *,
                  axes: tuple[str, ...]) -> tuple[jax.Array, dict[str, jax.Array]]:
  local = x.shape[0]
  all_x = jax.lax.all_gather(x, axes, tiled=True)
  all_y = jax.lax.all_gather(y, axes, tiled=True)
  total = all_x.shape[0]
  scale = jnp.exp(logit_scale)
  labels = _row_labels(axes, local)
  image_logits = scale * x @ all_y.T               # [B_local, B]: local images vs all texts
  text_logits = scale * y @ all_x.T                # [B_local, B]: local texts vs all images
  positive = scale * jnp.sum(x * y, axis=-1)
  nll = (jax.nn.logsumexp(image_logits, axis=-1) - positive
         + jax.nn.logsumexp(text_logits, axis=-1) - positive)
  loss = jax.lax.psum(jnp.sum(nll), axes) / (2 * total)
  correct = (jnp.sum(jnp.argmax(image_logits, -1) == labels)
             + jnp.sum(jnp.argmax(text_logits, -1) == labels))
  accuracy = jax.lax.psum(correct, axes) / (2 * total)
  return loss, {'accuracy': jax.lax.stop_gradient(accuracy)}


def _sigmoid_body(x: jax.Array, y: jax.Array, logit_scale: jax.Array, bias: jax.Array, *,
                  axes: tuple[str, ...]) -> tuple[jax.Array, dict[str, jax.Array]]:
  local = x.shape[0]
  all_x = jax.lax.all_gather(x, axes, tiled=True)
  all_y = jax.lax.all_gather(y, axes, tiled=True)
  total = all_x.shape[0]
  labels = _row_labels(axes, local)
  logits = jnp.exp(logit_scale) * x @ all_y.T + bias    # every pair (i, j) once, by row i
  signs = jnp.where(jnp.arange(total)[None, :] == labels[:, None], 1.0, -1.0)
  loss = -jax.lax.psum(jnp.sum(jax.nn.log_sigmoid(signs * logits)), axes) / total
  # Retrieval accuracy, as for the softmax loss (a metric: no gradient).
  text_logits = jax.lax.stop_gradient(y @ all_x.T)
  correct = (jnp.sum(jnp.argmax(logits, -1) == labels)
             + jnp.sum(jnp.argmax(text_logits, -1) == labels))
  accuracy = jax.lax.psum(correct, axes) / (2 * total)
  return loss, {'accuracy': jax.lax.stop_gradient(accuracy)}


def _ring_perm(size: int) -> list[tuple[int, int]]:
  return [(i, (i + 1) % size) for i in range(size)]


def _online_argmax(best: jax.Array, arg: jax.Array, values: jax.Array, offset: jax.Array,
                   axis: int) -> tuple[jax.Array, jax.Array]:
  """Running (max, global index of its first occurrence) after one more block along
  `axis` whose first entry has global index `offset`: jnp.argmax over the whole row,
  ties included, seen one block at a time in any order."""
  block_best = jnp.max(values, axis=axis)
  block_arg = jnp.argmax(values, axis=axis).astype(arg.dtype) + offset
  take = (block_best > best) | ((block_best == best) & (block_arg < arg))
  return jnp.where(take, block_best, best), jnp.where(take, block_arg, arg)


def _online_update(m: jax.Array, s: jax.Array, arg: jax.Array, logits: jax.Array,
                   offset: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Running (max, sum exp(. - max), first argmax) after one more block of logits
  along `axis`."""
  m_new, arg = _online_argmax(m, arg, logits, offset, axis)
  shifted = logits - jnp.expand_dims(m_new, axis)
  return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(shifted), axis=axis), arg


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring_lse(x: jax.Array, y: jax.Array, scale: jax.Array, axes: tuple[str, ...],
              size: int) -> tuple[jax.Array, ...]:
  """(lse of local image rows over all texts, lse of local text rows over all images,
  their global argmaxes). Call inside shard_map; `scale` must be varying over `axes`."""
  return _ring_lse_fwd(x, y, scale, axes, size)[0]


def _ring_lse_fwd(x, y, scale, axes, size):
  vary = lambda v: jax.lax.pcast(v, axes, to='varying')
  local = x.shape[0]
  me = jax.lax.axis_index(axes)
  neg_inf = vary(jnp.full((local,), -jnp.inf, x.dtype))
  zeros = vary(jnp.zeros((local,), x.dtype))
  no_index = vary(jnp.full((local,), size * local, jnp.int32))
  perm = _ring_perm(size)

  def step(k, carry):
    y_block, col_m, col_s, col_arg, row_m, row_s, row_arg = carry
    logits = scale * x @ y_block.T                 # [local images, texts of the block]
    # After k moves this device holds the texts of device me - k.
    row_m, row_s, row_arg = _online_update(row_m, row_s, row_arg, logits,
                                           ((me - k) % size) * local, axis=1)
    col_m, col_s, col_arg = _online_update(col_m, col_s, col_arg, logits, me * local, axis=0)
    # The text block moves on with the running statistics of its own columns; after
    # `size` moves it is home with its columns seen against every image block.
    y_block, col_m, col_s, col_arg = jax.lax.ppermute((y_block, col_m, col_s, col_arg),
                                                      axes, perm)
    return y_block, col_m, col_s, col_arg, row_m, row_s, row_arg

  _, col_m, col_s, col_arg, row_m, row_s, row_arg = jax.lax.fori_loop(
      0, size, step, (y, neg_inf, zeros, no_index, neg_inf, zeros, no_index))
  row_lse = row_m + jnp.log(row_s)
  col_lse = col_m + jnp.log(col_s)
  return (row_lse, col_lse, row_arg, col_arg), (x, y, scale, row_lse, col_lse)


def _ring_lse_bwd(axes, size, residuals, cotangents):
  x, y, scale, row_lse, col_lse = residuals
  g_row, g_col = cotangents[0], cotangents[1]      # the argmaxes are metrics: no gradient
  perm = _ring_perm(size)

  def step(_, carry):
    y_block, col_lse_block, g_col_block, dy_block, dx, dscale = carry
    dots = x @ y_block.T
    logits = scale * dots
    # d(sum_i g_i lse_row_i + sum_j g_j lse_col_j) / d logits_ij.
    g_logits = (g_row[:, None] * jnp.exp(logits - row_lse[:, None])
                + g_col_block[None, :] * jnp.exp(logits - col_lse_block[None, :]))
    dx = dx + scale * g_logits @ y_block
    dy_block = dy_block + scale * g_logits.T @ x
    dscale = dscale + jnp.sum(g_logits * dots)
    y_block, col_lse_block, g_col_block, dy_block = jax.lax.ppermute(
        (y_block, col_lse_block, g_col_block, dy_block), axes, perm)
    return y_block, col_lse_block, g_col_block, dy_block, dx, dscale

  init = (y, col_lse, g_col, jnp.zeros_like(y), jnp.zeros_like(x), jnp.zeros_like(scale))
  _, _, _, dy, dx, dscale = jax.lax.fori_loop(0, size, step, init)
  return dx, dy, dscale


_ring_lse.defvjp(_ring_lse_fwd, _ring_lse_bwd)


def _ring_body(x: jax.Array, y: jax.Array, logit_scale: jax.Array, *,
               axes: tuple[str, ...], size: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  total = x.shape[0] * size
  scale = jnp.exp(logit_scale)
  # A per-device copy: its cotangent is this device's share, summed by the transpose.
  row_lse, col_lse, row_arg, col_arg = _ring_lse(
      x, y, jax.lax.pcast(scale, axes, to='varying'), axes, size)
  positive = scale * jnp.sum(x * y, axis=-1)
  loss = jax.lax.psum(jnp.sum(row_lse - positive) + jnp.sum(col_lse - positive), axes)
  loss = loss / (2 * total)
  # A row is right when the argmax of its logits is its positive, ties as jnp.argmax.
  labels = _row_labels(axes, x.shape[0])
  correct = jnp.sum(row_arg == labels) + jnp.sum(col_arg == labels)
  accuracy = jax.lax.psum(correct, axes) / (2 * total)
  return loss, {'accuracy': jax.lax.stop_gradient(accuracy)}


def _home_signs(step: jax.Array, local: int) -> jax.Array:
  """+1 on the positive pairs, -1 elsewhere: the diagonal of the home block (step 0)."""
  eye = jnp.eye(local, dtype=bool)
  return jnp.where(eye & (step == 0), 1.0, -1.0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sigmoid(x: jax.Array, y: jax.Array, scale: jax.Array, bias: jax.Array,
                  axes: tuple[str, ...], size: int) -> tuple[jax.Array, ...]:
  """(sum of log sigmoid(z_ij (scale x_i.y_j + bias)) over the local image rows i and
  every text j, global argmax over texts of each local image row's logits, global
  argmax over images of each local text's x.y). Call inside shard_map; `scale` and
  `bias` must be varying over `axes`."""
  return _ring_sigmoid_fwd(x, y, scale, bias, axes, size)[0]


def _ring_sigmoid_fwd(x, y, scale, bias, axes, size):
  vary = lambda v: jax.lax.pcast(v, axes, to='varying')
  local = x.shape[0]
  me = jax.lax.axis_index(axes)
  neg_inf = vary(jnp.full((local,), -jnp.inf, x.dtype))
  no_index = vary(jnp.full((local,), size * local, jnp.int32))
  perm = _ring_perm(size)

  def step(k, carry):
    y_block, col_best, col_arg, row_best, row_arg, log_sig = carry
    dots = x @ y_block.T                           # [local images, texts of the block]
    logits = scale * dots + bias
    log_sig = log_sig + jnp.sum(jax.nn.log_sigmoid(_home_signs(k, local) * logits))
    # The metrics of 'sigmoid': images ranked by their logits, texts by x.y. After k
    # moves this device holds the texts of device me - k.
    source = (me - k) % size
    row_best, row_arg = _online_argmax(row_best, row_arg, logits, source * local, axis=1)
    col_best, col_arg = _online_argmax(col_best, col_arg, dots, me * local, axis=0)
    # The text block moves on with the ranking of its own column; after `size` moves it
    # is home, its texts ranked against every image.
    y_block, col_best, col_arg = jax.lax.ppermute((y_block, col_best, col_arg), axes, perm)
    return y_block, col_best, col_arg, row_best, row_arg, log_sig

  init = (y, neg_inf, no_index, neg_inf, no_index, jnp.zeros_like(scale))
  _, _, col_arg, _, row_arg, log_sig = jax.lax.fori_loop(0, size, step, init)
  return (log_sig, row_arg, col_arg), (x, y, scale, bias)


def _ring_sigmoid_bwd(axes, size, residuals, cotangents):
  x, y, scale, bias = residuals
  g = cotangents[0]                                # the argmaxes are metrics: no gradient
  local = x.shape[0]
  perm = _ring_perm(size)

  def step(k, carry):
    y_block, dy_block, dx, dscale, dbias = carry
    dots = x @ y_block.T
    signs = _home_signs(k, local)
    # d log sigmoid(z l) / dl = z sigmoid(-z l).
    g_logits = g * signs * jax.nn.sigmoid(-signs * (scale * dots + bias))
    dx = dx + scale * g_logits @ y_block
    # The block's gradient travels with it: after `size` moves both are home.
    dy_block = dy_block + scale * g_logits.T @ x
    dscale = dscale + jnp.sum(g_logits * dots)
    dbias = dbias + jnp.sum(g_logits)
    y_block, dy_block = jax.lax.ppermute((y_block, dy_block), axes, perm)
    return y_block, dy_block, dx, dscale, dbias

  init = (y, jnp.zeros_like(y), jnp.zeros_like(x), jnp.zeros_like(scale),
          jnp.zeros_like(bias))
  _, dy, dx, dscale, dbias = jax.lax.fori_loop(0, size, step, init)
  return dx, dy, dscale, dbias


_ring_sigmoid.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def _ring_sigmoid_body(x: jax.Array, y: jax.Array, logit_scale: jax.Array, bias: jax.Array,
                       *, axes: tuple[str, ...], size: int
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  local = x.shape[0]
  total = local * size
  vary = lambda v: jax.lax.pcast(v, axes, to='varying')
  # Per-device copies of the scalars: their cotangents are this device's shares.
  log_sig, row_arg, col_arg = _ring_sigmoid(x, y, vary(jnp.exp(logit_scale)), vary(bias),
                                            axes, size)
  loss = -jax.lax.psum(log_sig, axes) / total
  labels = _row_labels(axes, local)
  correct = jnp.sum(row_arg == labels) + jnp.sum(col_arg == labels)
  accuracy = jax.lax.psum(correct, axes) / (2 * total)
  return loss, {'accuracy': jax.lax.stop_gradient(accuracy)}


def make_loss(loss_config: Any, mesh: Mesh | MeshLayout) -> LossFn:
  """`loss(image_features, text_features, logit_scale, loss_params) -> (loss, metrics)`.

  Features are L2-normalised [B, E] arrays (any sharding: they are constrained to the
  batch axes of `mesh`, a MeshLayout or a Mesh with the default axis names); the loss
  is the exact mean over the global batch, replicated.
  """
  name = loss_config.name
  if name not in LOSSES:
    raise ValueError(f'config.loss.name: unknown loss {name!r}; expected one of {LOSSES}')
  layout = as_layout(mesh)
  axes, size, mesh = layout.batch_axes, layout.data_parallel_size, layout.mesh
  rows = P(axes, None)

  if name in SIGMOID_LOSSES:
    fn = (partial(_sigmoid_body, axes=axes) if name == 'sigmoid'
          else partial(_ring_sigmoid_body, axes=axes, size=size))
    body = jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, P(), P()),
                         out_specs=(P(), P()))

    def sigmoid_loss(x, y, logit_scale, loss_params):
      return body(x, y, logit_scale, loss_params['bias'])
    return sigmoid_loss

  if name == 'ring':
    fn = partial(_ring_body, axes=axes, size=size)
  else:
    fn = partial(_softmax_body, axes=axes)
  body = jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, P()), out_specs=(P(), P()))

  def softmax_loss(x, y, logit_scale, loss_params):
    del loss_params  # the softmax losses have none
    return body(x, y, logit_scale)
  return softmax_loss
