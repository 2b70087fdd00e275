"""AdamW for CLIP: decay mask, learning-rate multipliers and freezing by regex over names.

Every rule matches (`re.search`) the flattened name of a trainable leaf in the tree
the optimizer sees, `{'params': <model params>, 'loss_params': <loss params>}`:
'params/visual/transformer/resblocks_0/attn/qkv/kernel', 'params/logit_scale',
'loss_params/bias'. Rules are data in `config.optim` so `describe_param_groups` can
print, at start-up, exactly which leaves are decayed, scaled or frozen.

Weight decay follows the paper (and open_clip's `exclude`): gains and biases
(LayerNorm/BatchNorm `scale`/`bias`, every `bias`), the class and position embeddings
and the temperature are not decayed; kernels and the token embedding are. (open_clip
decides by `ndim < 2` or 'ln'/'bn'/'bias'/'logit_scale' in the name, which leaves its
2-D `positional_embedding` decayed; here position embeddings are never decayed.)
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.models.params import flatten_names

_MU_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _matches(patterns: Any, name: str) -> bool:
  return any(re.search(p, name) for p in patterns)


def _check_patterns(key: str, patterns: Any) -> None:
  for p in patterns:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      raise ValueError(f'config.optim.{key}: bad regex {p!r}: {e}') from None


def lr_multiplier(optim_config: Any, name: str) -> float:
  """The first matching (regex, multiplier) of `config.optim.lr_multipliers`, else 1."""
  for pattern, multiplier in optim_config.lr_multipliers:
    if re.search(pattern, name):
      return float(multiplier)
  return 1.0


def decay_mask(optim_config: Any, tree: Any) -> Any:
  """Tree of bools: True where weight decay applies."""
  names = flatten_names(tree).keys()
  treedef = jax.tree_util.tree_structure(tree)
  mask = [not _matches(optim_config.no_decay, n) for n in names]
  return jax.tree_util.tree_unflatten(treedef, mask)


def is_frozen(optim_config: Any, name: str) -> bool:
  """Whether the leaf named `name` (e.g. 'params/visual/conv1/kernel') is frozen."""
  return _matches(optim_config.freeze, name)


def _group(optim_config: Any, name: str) -> str:
  if is_frozen(optim_config, name):
    return 'frozen'
  return f'lr_x{lr_multiplier(optim_config, name):g}'


def param_groups(optim_config: Any, tree: Any) -> Any:
  """Tree of group labels: 'frozen' or 'lr_x<multiplier>' (the multi_transform labels)."""
  treedef = jax.tree_util.tree_structure(tree)
  labels = [_group(optim_config, n) for n in flatten_names(tree)]
  return jax.tree_util.tree_unflatten(treedef, labels)


def learning_rate_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """open_clip's `cosine_lr`, ending at `end_lr_factor` x peak instead of 0.

  Step s < W of a W-step warmup runs at peak * (s + 1) / W, so step 0 already learns
  (optax's warmup starts at 0); from s = W a cosine falls from peak to the end value at
  s = total_steps and stays there.
  """
  peak = float(optim_config.learning_rate)
  end = peak * float(optim_config.end_lr_factor)
  warmup = int(optim_config.warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)
  # One rounding of peak / W (a Python double), then one of the product: within 1 ulp
  # of the exact value. XLA would rewrite peak * (s + 1) / W less exactly.
  per_step = np.float32(peak / warmup if warmup else 0.0)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step)
    warm = (step + 1).astype(jnp.float32) * per_step
    progress = jnp.clip((step - warmup).astype(jnp.float32) / decay_steps, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)
  return schedule


# open_clip clamps the parameter to [0, ln 100] in place after every optimizer step: the
# temperature exp(logit_scale) stays within [1, 100]. The upper end is
# config.model.logit_scale_max; the lower end is fixed, as there.
LOGIT_SCALE_MIN = 0.0


def clamp_logit_scale(logit_scale_max: float) -> optax.GradientTransformation:
  """The last transform of the step: updates that land `params/logit_scale` in
  [LOGIT_SCALE_MIN, logit_scale_max]. Gradients are untouched (unlike a clip in the
  forward pass, which would zero them outside the range and could strand the parameter),
  so from a bound a gradient pointing inwards moves it back at once."""
  def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
    if params is None:
      raise ValueError('clamp_logit_scale: the update needs the params')
    if 'logit_scale' not in params['params']:
      return updates, state
    old = params['params']['logit_scale']
    new = jnp.clip(old + updates['params']['logit_scale'], LOGIT_SCALE_MIN, logit_scale_max)
    # old + (new - old) == new exactly at the bounds (Sterbenz), which apply_updates adds.
    updates = dict(updates, params=dict(updates['params'], logit_scale=new - old))
    return updates, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def validate_optim_config(optim_config: Any) -> None:
  """Raises ValueError naming the bad `config.optim.<key>`."""
  for key in ('no_decay', 'freeze'):
    _check_patterns(key, optim_config[key])
  for item in optim_config.lr_multipliers:
    if len(item) != 2:
      raise ValueError(f'config.optim.lr_multipliers: expected (regex, multiplier) pairs, '
                       f'got {item!r}')
    _check_patterns('lr_multipliers', [item[0]])
  if optim_config.mu_dtype not in _MU_DTYPES:
    raise ValueError(f'config.optim.mu_dtype: {optim_config.mu_dtype!r}; expected one of '
                     f'{list(_MU_DTYPES)}')
  if optim_config.learning_rate <= 0:
    raise ValueError(f'config.optim.learning_rate: expected > 0, got '
                     f'{optim_config.learning_rate}')
  if optim_config.warmup_steps < 0:
    raise ValueError(f'config.optim.warmup_steps: expected >= 0, got '
                     f'{optim_config.warmup_steps}')


def trainable_norm(optim_config: Any, grads: Any) -> jax.Array:
  """Global L2 norm of the gradients of the trainable (not frozen) leaves."""
  names = flatten_names(grads)
  return optax.global_norm([g for n, g in names.items()
                            if not _matches(optim_config.freeze, n)])


def clip_by_trainable_norm(optim_config: Any, max_norm: float
                           ) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` by the norm of the trainable leaves (frozen ones do not
  count). Its state is optax's (empty), so checkpoints keep their layout.

  The train step reports that norm as its `grad_norm` metric and hands it to
  `tx.update(..., grad_norm=norm)`, so a step computes it once; called without it (e.g.
  `tx.update(grads, state, params)`) the transform computes it itself.
  """
  def update(updates: Any, state: optax.EmptyState, params: Any = None, *,
             grad_norm: jax.Array | None = None, **extra_args: Any) -> tuple[Any, Any]:
    del params, extra_args
    norm = trainable_norm(optim_config, updates) if grad_norm is None else grad_norm
    keep = jnp.squeeze(norm < max_norm)
    # As optax.clip_by_global_norm: below the limit the update is passed through untouched.
    clipped = jax.tree_util.tree_map(
        lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates)
    return clipped, state
  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(config: Any) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping (`clip_by_trainable_norm`), AdamW (decoupled decay, masked),
  warmup+cosine, per-group LR, then the temperature clamp (`clamp_logit_scale`).

  Frozen leaves get `set_to_zero` and no Adam state (LiT keeps no moments for the
  locked tower); the clip norm is over the trainable leaves only. `update` takes the
  norm as `grad_norm=` when the caller has it (the train step).
  """
  oc = config.optim
  validate_optim_config(oc)
  schedule = learning_rate_schedule(oc, config.total_steps)
  mu_dtype = _MU_DTYPES[oc.mu_dtype]
  multipliers = {f'lr_x{float(m):g}': float(m) for _, m in oc.lr_multipliers}
  multipliers.setdefault('lr_x1', 1.0)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps, mu_dtype=mu_dtype),
        optax.add_decayed_weights(oc.weight_decay, mask=lambda t: decay_mask(oc, t)),
        optax.scale_by_learning_rate(lambda step: schedule(step) * multiplier))

  transforms: dict[str, optax.GradientTransformation] = {
      label: adamw(m) for label, m in multipliers.items()}
  transforms['frozen'] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, lambda t: param_groups(oc, t))
  if oc.grad_clip_norm:
    # Frozen gradients are zeroed before the clip, so none can reach a trainable leaf.
    frozen_to_zero = optax.masked(optax.set_to_zero(),
                                  lambda t: jax.tree_util.tree_map(
                                      lambda g: g == 'frozen', param_groups(oc, t)))
    tx = optax.chain(frozen_to_zero, clip_by_trainable_norm(oc, float(oc.grad_clip_norm)), tx)
  return optax.chain(tx, clamp_logit_scale(float(config.model.logit_scale_max)))


def describe_param_groups(config: Any, tree: Any) -> list[str]:
  """Lines for the start-up log: every trainable leaf, its shape, decay, LR x, frozen."""
  oc = config.optim
  mask = flatten_names(decay_mask(oc, tree))
  lines = [f'{"parameter":70s} {"shape":18s} decay  lr_x  frozen']
  counts = {'decayed': 0, 'not decayed': 0, 'frozen': 0}
  for name, leaf in flatten_names(tree).items():
    frozen = _matches(oc.freeze, name)
    size = int(np.prod(leaf.shape))
    counts['frozen' if frozen else 'decayed' if mask[name] else 'not decayed'] += size
    lines.append(f'{name:70s} {str(tuple(leaf.shape)):18s} {"yes" if mask[name] else "no":5s}  '
                 f'{lr_multiplier(oc, name):<4g}  {"yes" if frozen else "no"}')
  lines.append('parameters: ' + ', '.join(f'{v:,} {k}' for k, v in counts.items()))
  return lines

