"""Parameter placement rules: data parallel, FSDP, tensor parallel, regex overrides."""

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import sharding
from clip_jax.config import get_config
from clip_jax.models.clip import build_model, dummy_inputs
from clip_jax.models.params import flatten_names


def _abstract_params(config):
  """(shapes, logical axis names) of the model's parameters, allocating nothing."""
  model = build_model(config.model)
  boxed = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(config.model)), jax.random.key(0))
  return nn.meta.unbox(boxed)['params'], sharding.logical_axes_of(boxed)['params']


def _specs(mesh_shape, arch='ViT-B/32', **mesh_overrides):
  config = get_config(arch)
  config.mesh.update(mesh_overrides)
  shapes, logical = _abstract_params(config)
  specs = sharding.tree_partition_specs(shapes, logical, sharding.make_mesh(mesh_shape),
                                        sharding.rules_from_config(config.mesh))
  return flatten_names(specs)


BLOCK = 'visual/transformer/resblocks_0/'


def test_data_parallel_replicates_everything():
  assert set(_specs((8, 1, 1)).values()) == {P()}


def test_fsdp_splits_the_largest_dimension_of_big_arrays():
  specs = _specs((2, 4, 1))
  assert specs[BLOCK + 'mlp/c_fc/kernel'] == P(None, 'fsdp')            # [768, 3072]
  assert specs[BLOCK + 'mlp/c_proj/kernel'] == P('fsdp')                # [3072, 768]
  assert specs[BLOCK + 'attn/qkv/kernel'] == P('fsdp')                  # [768, 3, 12, 64]
  assert specs['text/token_embedding'] == P('fsdp')                     # [49408, 512]
  assert specs[BLOCK + 'ln_1/scale'] == P()                             # small: replicated
  assert specs['logit_scale'] == P()


def test_tensor_parallel_heads_and_mlp_combined_with_fsdp():
  specs = _specs((2, 2, 2))
  assert specs[BLOCK + 'attn/qkv/kernel'] == P('fsdp', None, 'model')
  assert specs[BLOCK + 'attn/qkv/bias'] == P(None, 'model')
  assert specs[BLOCK + 'attn/out/kernel'] == P('model', None, 'fsdp')
  assert specs[BLOCK + 'mlp/c_fc/kernel'] == P('fsdp', 'model')
  assert specs[BLOCK + 'mlp/c_fc/bias'] == P('model')
  assert specs[BLOCK + 'mlp/c_proj/kernel'] == P('model', 'fsdp')
  # Tensor parallel only: no fsdp axis in any spec.
  tp = _specs((4, 1, 2))
  assert tp[BLOCK + 'mlp/c_fc/kernel'] == P(None, 'model')
  assert all('fsdp' not in str(s) for s in tp.values())


def test_scanned_layers_axis_is_never_split():
  config_specs = _specs((2, 4, 1), 'tiny', fsdp_min_size=1)
  assert config_specs['visual/transformer/resblocks_0/mlp/c_fc/kernel'] == P(None, 'fsdp')
  shapes, logical = _abstract_params(get_config('tiny', scan_layers=True))
  specs = flatten_names(sharding.tree_partition_specs(
      shapes, logical, sharding.make_mesh((4, 2, 1)), sharding.ShardingRules(fsdp_min_size=1)))
  # [layers=2, 64, 256]: the layer axis (size 2, divisible) is skipped.
  assert specs['visual/transformer/resblocks/mlp/c_fc/kernel'] == P(None, None, 'fsdp')
  assert specs['visual/transformer/resblocks/ln_1/scale'] == P(None, 'fsdp')


def test_regex_rules_come_first_and_are_checked():
  specs = _specs((2, 2, 2), param_rules=((r'token_embedding$', 'model,fsdp'),
                                         (r'/mlp/', '')))
  assert specs['text/token_embedding'] == P('model', 'fsdp')
  assert specs[BLOCK + 'mlp/c_fc/kernel'] == P()
  assert specs[BLOCK + 'attn/qkv/kernel'] == P('fsdp', None, 'model')   # falls through
  with pytest.raises(ValueError, match=r'config\.mesh\.param_rules.*size 3'):
    _specs((2, 2, 2), param_rules=((r'qkv/kernel', ',fsdp'),))
  with pytest.raises(ValueError, match=r'config\.mesh\.param_rules.*tensor'):
    _specs((2, 2, 2), param_rules=((r'proj', 'tensor'),))
  with pytest.raises(ValueError, match=r'config\.mesh\.param_rules: bad regex'):
    _specs((2, 2, 2), param_rules=((r'(', ''),))


def test_tensor_parallel_step_does_not_gather_kernels():
  """Under tensor parallelism (heads split over 'model') the compiled step keeps the q/k/v
  and output kernels split: the only all-gathers are the loss's (features, across 'data').
  Merging the q/k/v axis with the heads axis in a reshape made XLA gather every kernel."""
  import re  # pylint: disable=import-outside-toplevel
  from clip_jax import train_step  # pylint: disable=import-outside-toplevel
  from clip_jax.benchmark import synthetic_batch  # pylint: disable=import-outside-toplevel
  config = get_config('tiny')
  config.mesh.shape = (4, 1, 2)
  config.batch_size = 8
  mesh = sharding.layout_from_config(config.mesh)
  model = build_model(config.model)
  abstract, shardings = train_step.train_state_shardings(config, model, mesh)
  state = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=sharding.batch_sharding(mesh, v.ndim))
           for k, v in synthetic_batch(config.model, 8).items()}
  step = train_step.make_train_step(config, model, mesh, shardings)
  text = step.lower(state, batch).compile().as_text()
  gathers = re.findall(r'= \S+ all-gather\(', text)
  assert len(gathers) <= 2, f'{len(gathers)} all-gathers: a tensor-parallel kernel is gathered'
