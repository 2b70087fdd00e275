"""Pure functions over parameter trees that do not depend on the model code."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

_LAYER = re.compile(r'^resblocks_(\d+)$')


def stack_layers(tree: Any) -> Any:
  """Unrolled -> scanned layout: {'resblocks_0': t0, ...} becomes {'resblocks': stack(t_i)}."""
  if not isinstance(tree, dict):
    return tree
  layers = sorted((int(m.group(1)), k) for k in tree if (m := _LAYER.match(k)))
  out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER.match(k)}
  if layers:
    if [i for i, _ in layers] != list(range(len(layers))):
      raise ValueError(f'stack_layers: layer indices are not contiguous: {[k for _, k in layers]}')
    out['resblocks'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                              *[tree[k] for _, k in layers])
  return out


def unstack_layers(tree: Any) -> Any:
  """Scanned -> unrolled layout: the inverse of `stack_layers`."""
  if not isinstance(tree, dict):
    return tree
  out = {k: unstack_layers(v) for k, v in tree.items() if k != 'resblocks'}
  if 'resblocks' in tree:
    stacked = tree['resblocks']
    num = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(num):
      out[f'resblocks_{i}'] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return out


def flatten_names(tree: Any, sep: str = '/') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}: the names that sharding, masking and freezing rules match."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sep.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): leaf
          for path, leaf in flat}
