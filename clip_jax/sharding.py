"""Device mesh, the shardings of batches, and the placement rules of parameters.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded), `model` (tensor parallel). A batch is split
over `data` and `fsdp` together: both are data-parallel axes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax.models.params import flatten_names

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the one -1 entry by what is left of `num_devices`; checks the product."""
  shape = tuple(int(s) for s in shape)
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f'config.mesh.shape: at most one -1 allowed, got {shape}')
  known = int(np.prod([s for s in shape if s != -1]))
  if known <= 0 or num_devices % known:
    raise ValueError(f'config.mesh.shape: {shape} does not divide the {num_devices} devices')
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f'config.mesh.shape: {shape} uses {int(np.prod(shape))} devices but '
                     f'{num_devices} are present; use -1 for "the rest"')
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices of all hosts (or `devices`), laid out for fast collectives.

  The axes are `Auto` (the compiler propagates shardings from the annotated inputs and
  outputs, as pjit): the models know nothing of meshes, so they cannot carry the
  explicit per-op shardings that `jax.make_mesh`'s default `Explicit` axes demand.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, tuple(axes), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


# ---------------------------------------------------------------------------------------
# Parameter placement: logical axis names (on every parameter, see models/layers.py) and
# ordered rules -> a PartitionSpec per array. The same function places parameters,
# optimizer state and BatchNorm statistics; the mesh shape picks the strategy:
#   (n, 1, 1)  data parallel: everything replicated;
#   (d, f, 1)  FSDP: the largest suitable dimension of each big array split over `fsdp`;
#   (d, f, m)  + tensor parallel: the logical axes named by `logical_rules` split over `model`.
# Mesh axes of size 1 are left out of the specs, so a spec says what is really split.
# ---------------------------------------------------------------------------------------

DEFAULT_LOGICAL_RULES = (('heads', 'model'), ('mlp', 'model'))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How arrays are placed on the mesh (built from `config.mesh` by `rules_from_config`).

  param_rules: ordered (regex, spec) pairs matched with `re.search` against the
    parameter's flattened name ('visual/transformer/resblocks_0/attn/qkv/kernel'); the
    first match wins and `spec` ('fsdp,model', ',fsdp', '' for replicated) gives the mesh
    axes per dimension. Names no pattern matches fall through to the logical rules.
  logical_rules: ordered (logical axis, mesh axis) pairs; each dimension takes the first
    rule for its logical name whose mesh axis is unused in that array and divides it.
  fsdp_axis / fsdp_min_size: arrays with at least `fsdp_min_size` elements get their
    largest remaining divisible dimension (never a scanned `layers` axis) split over
    `fsdp_axis`.
  """
  param_rules: tuple[tuple[str, str], ...] = ()
  logical_rules: tuple[tuple[str, str], ...] = DEFAULT_LOGICAL_RULES
  fsdp_axis: str = 'fsdp'
  fsdp_min_size: int = 2 ** 12


def rules_from_config(mesh_config: Any) -> ShardingRules:
  """`config.mesh` -> ShardingRules, checking the shapes of the rule lists."""
  def pairs(key: str, default: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    value = mesh_config.get(key, default)
    out = []
    for item in value:
      if len(item) != 2:
        raise ValueError(f'config.mesh.{key}: expected (pattern, axes) pairs, got {item!r}')
      out.append((str(item[0]), '' if item[1] is None else str(item[1])))
    return tuple(out)
  for pattern, _ in pairs('param_rules'):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'config.mesh.param_rules: bad regex {pattern!r}: {e}') from None
  return ShardingRules(param_rules=pairs('param_rules'),
                       logical_rules=pairs('logical_rules', DEFAULT_LOGICAL_RULES),
                       fsdp_axis=mesh_config.get('fsdp_axis', 'fsdp'),
                       fsdp_min_size=int(mesh_config.get('fsdp_min_size', 2 ** 12)))


def _parse_spec(text: str, name: str, ndim: int) -> list[Any]:
  parts = [p.strip() for p in text.split(',')] if text.strip() else []
  if len(parts) > ndim:
    raise ValueError(f'config.mesh.param_rules: spec {text!r} has {len(parts)} entries but '
                     f'{name} has {ndim} dimensions')
  axes: list[Any] = []
  for p in parts:
    if p in ('', 'None', 'none'):
      axes.append(None)
    else:
      group = tuple(a.strip() for a in p.split('+'))   # 'fsdp+model': one dim over two axes
      axes.append(group[0] if len(group) == 1 else group)
  return axes + [None] * (ndim - len(axes))


def _axis_size(mesh: Mesh, axes: Any) -> int:
  group = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in group]))


def _drop_unit_axes(mesh: Mesh, axes: Sequence[Any]) -> P:
  """Removes mesh axes of size 1 (and trailing Nones) so the spec states the real split."""
  out = []
  for a in axes:
    group = a if isinstance(a, tuple) else (a,) if a is not None else ()
    group = tuple(g for g in group if mesh.shape[g] > 1)
    out.append(None if not group else group[0] if len(group) == 1 else group)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_partition_spec(name: str, shape: Sequence[int], logical_axes: Sequence[str | None],
                         mesh: Mesh, rules: ShardingRules) -> P:
  """The PartitionSpec of one array from its name, shape and logical axis names."""
  shape = tuple(shape)
  logical_axes = tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes))
  for pattern, spec in rules.param_rules:
    if re.search(pattern, name):
      axes = _parse_spec(spec, name, len(shape))
      for dim, (size, a) in enumerate(zip(shape, axes)):
        if a is None:
          continue
        group = a if isinstance(a, tuple) else (a,)
        missing = [g for g in group if g not in mesh.axis_names]
        if missing:
          raise ValueError(f'config.mesh.param_rules: {pattern!r} names mesh axes {missing} '
                           f'that are not in the mesh {mesh.axis_names}')
        if size % _axis_size(mesh, a):
          raise ValueError(f'config.mesh.param_rules: {pattern!r} splits dimension {dim} '
                           f'(size {size}) of {name} over {a} of size {_axis_size(mesh, a)}')
      return _drop_unit_axes(mesh, axes)

  axes: list[Any] = [None] * len(shape)
  used: set[str] = set()
  for dim, logical in enumerate(logical_axes):
    for logical_name, mesh_axis in rules.logical_rules:
      if (logical_name == logical and mesh_axis in mesh.axis_names and mesh_axis not in used
          and mesh.shape[mesh_axis] > 1 and shape[dim] % mesh.shape[mesh_axis] == 0):
        axes[dim] = mesh_axis
        used.add(mesh_axis)
        break

  fsdp = rules.fsdp_axis
  if (fsdp in mesh.axis_names and mesh.shape[fsdp] > 1 and fsdp not in used
      and int(np.prod(shape, dtype=np.int64)) >= rules.fsdp_min_size):
    candidates = [d for d in range(len(shape))
                  if axes[d] is None and logical_axes[d] != 'layers'
                  and shape[d] % mesh.shape[fsdp] == 0]
    if candidates:
      axes[max(candidates, key=lambda d: (shape[d], -d))] = fsdp
  return _drop_unit_axes(mesh, axes)


def logical_axes_of(boxed_tree: Any) -> Any:
  """Tree of logical-axis tuples from a tree of flax `LogicallyPartitioned` boxes.

  Leaves that are not boxed (e.g. BatchNorm statistics) get `()`, i.e. no names.
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree_util.tree_map(lambda x: tuple(x.names) if is_box(x) else (),
                                boxed_tree, is_leaf=is_box)


def tree_partition_specs(shapes: Any, logical: Any, mesh: Mesh, rules: ShardingRules) -> Any:
  """PartitionSpecs for a tree of arrays/ShapeDtypeStructs with a matching tree of names."""
  names = list(flatten_names(shapes).keys())
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  logical_leaves = treedef.flatten_up_to(logical)
  specs = [param_partition_spec(n, leaf.shape, tuple(lg), mesh, rules)
           for n, leaf, lg in zip(names, leaves, logical_leaves)]
  return jax.tree_util.tree_unflatten(treedef, specs)


def to_named_shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def mesh_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`config.mesh` (shape with one -1, axes) -> Mesh over all devices of all processes."""
  return make_mesh(tuple(mesh_config.shape), tuple(mesh_config.axes), devices)


def describe_shardings(shapes: Any, specs: Any) -> list[str]:
  """One line per array: name, global shape, spec; for the start-up log."""
  flat_specs = flatten_names(jax.tree_util.tree_map(
      lambda s: str(tuple(s)), specs, is_leaf=lambda x: isinstance(x, P)))
  return [f'{name:70s} {str(tuple(leaf.shape)):20s} {flat_specs[name]}'
          for name, leaf in flatten_names(shapes).items()]


def specs_by_name_suffix(tree: Any, named_specs: dict[str, P], shapes: dict[str, Any]) -> Any:
  """Specs for a tree whose leaves copy named arrays (e.g. Adam's moments of parameters).

  A leaf whose flattened name ends with a known name ('.../mu/params/visual/proj' ends
  with 'params/visual/proj') and has that array's shape gets its spec; every other
  leaf (step counters, ...) is replicated.
  """
  out = []
  for name, leaf in flatten_names(tree).items():
    parts = name.split('/')
    spec = P()
    for i in range(len(parts)):
      candidate = '/'.join(parts[i:])
      if candidate in named_specs:
        if tuple(shapes[candidate]) == tuple(leaf.shape):
          spec = named_specs[candidate]
        break
    out.append(spec)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), out)
