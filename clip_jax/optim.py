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
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_lr_factor` x it."""
  peak = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  decay_steps = max(int(total_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=decay_steps,
      end_value=peak * float(optim_config.end_lr_factor))


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


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked), global-norm clipping, warmup+cosine, per-group LR.

  Frozen leaves get `set_to_zero` and no Adam state (LiT keeps no moments for the
  locked tower); the clip norm is over the trainable leaves only.
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
    # Clip on the trainable leaves: frozen gradients are zeroed before the norm.
    frozen_to_zero = optax.masked(optax.set_to_zero(),
                                  lambda t: jax.tree_util.tree_map(
                                      lambda g: g == 'frozen', param_groups(oc, t)))
    tx = optax.chain(frozen_to_zero, optax.clip_by_global_norm(oc.grad_clip_norm), tx)
  return tx


def trainable_norm(optim_config: Any, grads: Any) -> jax.Array:
  """Global L2 norm of the gradients of the trainable (not frozen) leaves."""
  names = flatten_names(grads)
  return optax.global_norm([g for n, g in names.items()
                            if not _matches(optim_config.freeze, n)])


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

