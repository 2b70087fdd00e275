"""Device mesh, the shardings of batches, and the placement rules of parameters.

A `MeshLayout`, built once from `config.mesh` (`layout_from_config`), is the one
description of the mesh: the jax Mesh, the axes that carry the batch, and the placement
rules (with the FSDP axis and the tensor-parallel axes their logical rules name). The
batch shardings, the losses, the train step and evaluation all read it. By default the
mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters
and optimizer state sharded), `model` (tensor parallel); a batch is split over `data`
and `fsdp` together. Every name can be changed in `config.mesh`.
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

# The defaults of config.mesh (clip_jax/config.py reads them from here).
MESH_SHAPE = (-1, 1, 1)            # every device on the first axis: data parallel
MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')
FSDP_AXIS = 'fsdp'
DEFAULT_LOGICAL_RULES = (('heads', 'model'), ('mlp', 'model'))
FSDP_MIN_SIZE = 2 ** 12


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the one -1 entry by what is left of `num_devices`; checks the product."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'config.mesh.shape: {shape}: expected positive sizes with at most one -1')
  known = int(np.prod([s for s in shape if s != -1]))
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if num_devices % known or int(np.prod(resolved)) != num_devices:
    raise ValueError(f'config.mesh.shape: {shape} does not fit the {num_devices} device(s) of '
                     f'this run; the sizes must multiply to {num_devices} (one -1 takes the '
                     'devices that are left)')
  return resolved


def make_mesh(shape: Sequence[int] = MESH_SHAPE, axes: Sequence[str] = MESH_AXES,
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


# ---------------------------------------------------------------------------------------
# Parameter placement: logical axis names (on every parameter, see models/layers.py) and
# ordered rules -> a PartitionSpec per array. The same function places parameters,
# optimizer state and BatchNorm statistics; the mesh shape picks the strategy (default
# axis names):
#   (n, 1, 1)  data parallel: everything replicated;
#   (d, f, 1)  FSDP: the largest suitable dimension of each big array split over `fsdp`;
#   (d, f, m)  + tensor parallel: the logical axes named by `logical_rules` split over `model`.
# Mesh axes of size 1 are left out of the specs, so a spec says what is really split.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How arrays are placed on the mesh (built from `config.mesh` by `rules_from_config`).

  param_rules: ordered (regex, spec) pairs matched with `re.search` against the
    parameter's flattened name ('visual/transformer/resblocks_0/attn/qkv/kernel'); the
    first match wins and `spec` ('fsdp,model', ',fsdp', '' for replicated) gives the mesh
    axes per dimension. Names no pattern matches fall through to the logical rules.
  logical_rules: ordered (logical axis, mesh axis) pairs; each dimension takes the first
    rule for its logical name whose mesh axis is unused in that array and divides it.
    The mesh axes they name are the tensor-parallel ones.
  fsdp_axis / fsdp_min_size: arrays with at least `fsdp_min_size` elements get their
    largest remaining divisible dimension (never a scanned `layers` axis) split over
    `fsdp_axis` ('' = no FSDP).
  """
  param_rules: tuple[tuple[str, str], ...] = ()
  logical_rules: tuple[tuple[str, str], ...] = DEFAULT_LOGICAL_RULES
  fsdp_axis: str = FSDP_AXIS
  fsdp_min_size: int = FSDP_MIN_SIZE


def _check_axis_roles(axes: tuple[str, ...], batch_axes: tuple[str, ...],
                      rules: ShardingRules) -> None:
  """Every axis a role names (batch, FSDP, logical rules) is one of `axes`, the mesh's.

  A name that is not would silently replicate what it should split.
  """
  if len(set(axes)) != len(axes):
    raise ValueError(f'config.mesh.axes: {axes} names an axis twice')
  if not batch_axes or len(set(batch_axes)) != len(batch_axes):
    raise ValueError(f'config.mesh.batch_axes: {batch_axes}: expected one or more distinct '
                     f'axes of config.mesh.axes {axes}')
  unknown = [a for a in batch_axes if a not in axes]
  if unknown:
    raise ValueError(f'config.mesh.batch_axes: {unknown} not in config.mesh.axes {axes}')
  if rules.fsdp_axis and rules.fsdp_axis not in axes:
    raise ValueError(f'config.mesh.fsdp_axis: {rules.fsdp_axis!r} not in config.mesh.axes '
                     f'{axes} ("" = no FSDP)')
  for logical, mesh_axis in rules.logical_rules:
    if mesh_axis not in axes:
      raise ValueError(f'config.mesh.logical_rules: ({logical!r}, {mesh_axis!r}) names a mesh '
                       f'axis not in config.mesh.axes {axes}')


def rules_from_config(mesh_config: Any) -> ShardingRules:
  """`config.mesh` -> ShardingRules, checking every key of the section: shape against
  axes, the rule lists, and that each axis a role names is a mesh axis."""
  def pairs(key: str, default: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    value = mesh_config.get(key, default)
    out = []
    for item in value:
      if len(item) != 2:
        raise ValueError(f'config.mesh.{key}: expected (pattern, axes) pairs, got {item!r}')
      out.append((str(item[0]), '' if item[1] is None else str(item[1])))
    return tuple(out)
  shape, axes = tuple(mesh_config.get('shape', MESH_SHAPE)), _axes(mesh_config, 'axes')
  if len(shape) != len(axes):
    raise ValueError(f'config.mesh.shape: {shape} has {len(shape)} entries but '
                     f'config.mesh.axes names {len(axes)}')
  for pattern, _ in pairs('param_rules'):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'config.mesh.param_rules: bad regex {pattern!r}: {e}') from None
  rules = ShardingRules(param_rules=pairs('param_rules'),
                        logical_rules=pairs('logical_rules', DEFAULT_LOGICAL_RULES),
                        fsdp_axis=str(mesh_config.get('fsdp_axis', FSDP_AXIS)),
                        fsdp_min_size=int(mesh_config.get('fsdp_min_size', FSDP_MIN_SIZE)))
  _check_axis_roles(axes, _axes(mesh_config, 'batch_axes'), rules)
  return rules


def _axes(mesh_config: Any, key: str) -> tuple[str, ...]:
  """config.mesh.axes or .batch_axes, as a tuple of names."""
  return tuple(str(a) for a in mesh_config.get(key, {'axes': MESH_AXES,
                                                     'batch_axes': BATCH_AXES}[key]))


# ---------------------------------------------------------------------------------------
# The mesh description: built once, handed to everything that splits arrays over it.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """The jax Mesh and the role of each of its axes (`config.mesh`, `layout_from_config`).

  batch_axes: the data-parallel axes, in order: every batch's leading dimension is split
    over them together, and the losses gather features over them.
  rules: parameter placement; its `fsdp_axis` shards parameters and optimizer state, its
    logical rules name the tensor-parallel axes.
  The default (`MeshLayout(mesh)`) is the default `config.mesh`'s description.
  """
  mesh: Mesh
  batch_axes: tuple[str, ...] = BATCH_AXES
  rules: ShardingRules = dataclasses.field(default_factory=ShardingRules)

  def __post_init__(self):
    object.__setattr__(self, 'batch_axes', tuple(self.batch_axes))   # hashable, as a key
    _check_axis_roles(tuple(self.mesh.axis_names), self.batch_axes, self.rules)

  @property
  def data_parallel_size(self) -> int:
    """Devices over which a batch is split (the product of the batch axes' sizes)."""
    return int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))


def layout_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None,
                       mesh: Mesh | None = None) -> MeshLayout:
  """`config.mesh` -> its MeshLayout, over a new mesh of `shape` over all devices of all
  processes (or `devices`), or over `mesh`, whose axes must be `config.mesh.axes`."""
  rules = rules_from_config(mesh_config)
  axes = _axes(mesh_config, 'axes')
  if mesh is None:
    mesh = make_mesh(tuple(mesh_config.get('shape', MESH_SHAPE)), axes, devices)
  elif tuple(mesh.axis_names) != axes:
    raise ValueError(f'config.mesh.axes: {axes}, but the mesh given has the axes '
                     f'{tuple(mesh.axis_names)}')
  return MeshLayout(mesh, _axes(mesh_config, 'batch_axes'), rules)


def as_layout(mesh: Mesh | MeshLayout, mesh_config: Any = None) -> MeshLayout:
  """A MeshLayout as it is; a bare Mesh described by `mesh_config` (`config.mesh`), or
  without one by the defaults, which must then name its axes."""
  if isinstance(mesh, MeshLayout):
    return mesh
  if mesh_config is not None:
    return layout_from_config(mesh_config, mesh=mesh)
  try:
    return MeshLayout(mesh)
  except ValueError as error:
    raise ValueError(f'{error}. A bare Mesh is read with the default axis roles; describe '
                     'this one with clip_jax.sharding.layout_from_config(config.mesh)') from None


def batch_sharding(mesh: Mesh | MeshLayout, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over the batch axes, the rest replicated."""
  layout = as_layout(mesh)
  return NamedSharding(layout.mesh, P(layout.batch_axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh | MeshLayout) -> NamedSharding:
  """A whole copy on every device (whatever the axes' roles)."""
  return NamedSharding(mesh.mesh if isinstance(mesh, MeshLayout) else mesh, P())


def data_parallel_size(mesh: Mesh | MeshLayout) -> int:
  return as_layout(mesh).data_parallel_size


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
