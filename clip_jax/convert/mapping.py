"""The machinery both PyTorch layouts share: named tensors <-> clip_jax variables.

A layout is a list of `Entry`s, each tying one clip_jax variable (by its flat name,
collection first: `params/visual/conv1/kernel`) to one or more PyTorch tensors, with a
`kind` that says how the values move between them. Every kind is a pure reshape or
transpose, so values round-trip bit for bit; only an explicit dtype cast changes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clip_jax.models import param_shapes
from clip_jax.models.params import flatten_names, stack_layers, unstack_layers

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_keys: tuple[str, ...]
  name: str          # flat clip_jax name, e.g. 'params/visual/transformer/resblocks_0/ln_1/scale'
  kind: str          # a key of KINDS


@dataclasses.dataclass(frozen=True)
class Kind:
  """How one clip_jax array relates to its PyTorch tensor(s)."""
  to_flax: Callable[[list[np.ndarray], Shape], np.ndarray]
  to_torch: Callable[[np.ndarray], list[np.ndarray]]
  torch_shapes: Callable[[Shape], list[Shape]]


def _split_qkv_to_flax(ws: list[np.ndarray], shape: Shape) -> np.ndarray:
  width, _, heads, head_dim = shape
  return np.stack([w.T.reshape(width, heads, head_dim) for w in ws], axis=1)


KINDS: dict[str, Kind] = {
    # Same values, same shape: embeddings, norms, biases, scalars.
    'copy': Kind(lambda a, s: a[0], lambda x: [x], lambda s: [s]),
    # nn.Linear [out, in] <-> Dense [in, out]; also OpenAI's projections stored as Linear by HF.
    'linear': Kind(lambda a, s: a[0].T, lambda x: [x.T], lambda s: [s[::-1]]),
    # Conv2d OIHW <-> HWIO.
    'conv': Kind(lambda a, s: a[0].transpose(2, 3, 1, 0), lambda x: [x.transpose(3, 2, 0, 1)],
                 lambda s: [(s[3], s[2], s[0], s[1])]),
    # nn.MultiheadAttention in_proj_weight [3W, W] <-> qkv kernel [W, 3, H, D].
    'fused_qkv_kernel': Kind(
        lambda a, s: a[0].reshape(3, s[2], s[3], s[0]).transpose(3, 0, 1, 2),
        lambda x: [x.transpose(1, 2, 3, 0).reshape(-1, x.shape[0])],
        lambda s: [(3 * s[2] * s[3], s[0])]),
    # in_proj_bias [3W] <-> qkv bias [3, H, D].
    'fused_qkv_bias': Kind(lambda a, s: a[0].reshape(s), lambda x: [x.reshape(-1)],
                           lambda s: [(s[0] * s[1] * s[2],)]),
    # Separate q/k/v nn.Linear weights [W, W] (Hugging Face) <-> qkv kernel [W, 3, H, D].
    'split_qkv_kernel': Kind(
        _split_qkv_to_flax,
        lambda x: [x[:, i].reshape(x.shape[0], -1).T for i in range(3)],
        lambda s: [(s[2] * s[3], s[0])] * 3),
    'split_qkv_bias': Kind(lambda a, s: np.stack([b.reshape(s[1:]) for b in a]),
                           lambda x: [x[i].reshape(-1) for i in range(3)],
                           lambda s: [(s[1] * s[2],)] * 3),
    # out_proj.weight [W, H*D] <-> out kernel [H, D, W].
    'heads_out_kernel': Kind(lambda a, s: a[0].T.reshape(s),
                             lambda x: [x.reshape(-1, x.shape[-1]).T],
                             lambda s: [(s[2], s[0] * s[1])]),
}


def prefixed(table: Sequence[tuple[tuple[str, ...], str, str]], torch_prefix: str,
             flax_prefix: str) -> list[Entry]:
  """Entries from a (torch key suffixes, clip_jax name suffix, kind) table under two prefixes."""
  return [Entry(tuple(torch_prefix + k for k in keys), flax_prefix + name, kind)
          for keys, name, kind in table]


def norm(torch_prefix: str, flax_name: str) -> list[Entry]:
  """A LayerNorm (or BatchNorm's affine part): weight/bias <-> scale/bias."""
  return [Entry((torch_prefix + 'weight',), f'params/{flax_name}/scale', 'copy'),
          Entry((torch_prefix + 'bias',), f'params/{flax_name}/bias', 'copy')]


class KeyMismatchError(ValueError):
  """A state dict whose keys or shapes do not fit the expected architecture."""


def unscanned(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same model with unrolled layers: the layout PyTorch names follow."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.scan_layers = False
  return cfg


def expected_shapes(cfg: ml_collections.ConfigDict) -> dict[str, Shape]:
  """Flat clip_jax name -> shape for a model config (unrolled layers), allocating nothing."""
  return dict(_shapes_of(json.dumps(unscanned(cfg).to_dict(), sort_keys=True, default=list)))


@functools.lru_cache(maxsize=16)
def _shapes_of(cfg_json: str) -> tuple[tuple[str, Shape], ...]:
  # Tracing the model takes seconds; import and export of one model ask for the same shapes.
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  return tuple((k, tuple(v.shape)) for k, v in flatten_names(param_shapes(cfg)).items())


def torch_shapes(entries: Sequence[Entry], shapes: Mapping[str, Shape]) -> dict[str, Shape]:
  """PyTorch key -> shape that the entries expect for a model of `shapes`."""
  out = {}
  for entry in entries:
    for key, shape in zip(entry.torch_keys, KINDS[entry.kind].torch_shapes(shapes[entry.name])):
      out[key] = tuple(shape)
  return out


def check_keys(source: str, state: Mapping[str, np.ndarray], want: Mapping[str, Shape],
               ignored: Callable[[str], bool], what: str) -> None:
  """Raises KeyMismatchError naming the first missing, mis-shaped or unexpected key."""
  for key, shape in want.items():
    if key not in state:
      raise KeyMismatchError(f'{source}: missing key {key!r} (expected shape {shape} for {what})')
    found = tuple(state[key].shape)
    if found != shape:
      raise KeyMismatchError(f'{source}: key {key!r} has shape {found}, expected {shape} for '
                             f'{what}')
  extra = [k for k in state if k not in want and not ignored(k)]
  if extra:
    raise KeyMismatchError(
        f'{source}: unexpected key {extra[0]!r} (shape {tuple(state[extra[0]].shape)}) for '
        f'{what}' + (f'; {len(extra)} unexpected keys in all' if len(extra) > 1 else ''))


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def set_layer_layout(variables: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
  """Variables in the scanned (stacked) or unrolled layout that `scan_layers` asks for."""
  convert = stack_layers if scan_layers else unstack_layers
  return {collection: convert(tree) for collection, tree in variables.items()}


def to_variables(entries: Sequence[Entry], state: Mapping[str, np.ndarray],
                 cfg: ml_collections.ConfigDict, shapes: Mapping[str, Shape], dtype: Any
                 ) -> dict[str, Any]:
  """clip_jax variables ({'params', maybe 'batch_stats'}) from checked PyTorch tensors.

  `shapes` are `expected_shapes(cfg)`. Floating arrays are cast to `dtype` (None keeps
  each tensor's own dtype).
  """
  flat = {}
  for entry in entries:
    value = KINDS[entry.kind].to_flax([np.asarray(state[k]) for k in entry.torch_keys],
                                      shapes[entry.name])
    if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(dtype)
    flat[entry.name] = value
  missing = [n for n in shapes if n not in flat]
  if missing:   # a layout that forgets a variable is a bug here, not in the user's file
    raise AssertionError(f'layout has no entry for {missing[0]}')
  return set_layer_layout(_unflatten(flat), bool(cfg.get('scan_layers', False)))


def from_variables(entries: Sequence[Entry], variables: Mapping[str, Any]
                   ) -> dict[str, np.ndarray]:
  """PyTorch tensors (numpy, in entry order) from clip_jax variables of either layout."""
  flat = flatten_names(set_layer_layout(jax.device_get(dict(variables)), False))
  out = {}
  for entry in entries:
    if entry.name not in flat:
      raise KeyMismatchError(f'clip_jax variables lack {entry.name!r}, which PyTorch key(s) '
                             f'{", ".join(entry.torch_keys)} need')
    for key, value in zip(entry.torch_keys, KINDS[entry.kind].to_torch(np.asarray(flat[entry.name]))):
      out[key] = value
  return out
