"""The Flax towers: OpenAI's parameter counts, numerics of the model options, text pooling."""

import ast
import dataclasses
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import clip_jax
from clip_jax.models import (OPENAI_NAMES, build_model, count_params, init_variables,
                             model_config, openai_constants, param_shapes)
from clip_jax.models.architectures import ARCHITECTURE_KEYS, MODEL_DEFAULTS, ModelOptions
from clip_jax.models.layers import Transformer
from clip_jax.models.params import flatten_names, stack_layers, unstack_layers
from clip_jax.models.text import eot_positions

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference',
                         'openai_models.json')
# The published counts, kept here too so the test runs where ../shared is absent.
PARAMS = {'RN50': (102007137, 38316896), 'RN101': (119688033, 56259936),
          'RN50x4': (178300601, 87137080), 'RN50x16': (290979217, 167328912),
          'RN50x64': (623258305, 420380352), 'ViT-B/32': (151277313, 87849216),
          'ViT-B/16': (149620737, 86192640), 'ViT-L/14': (427616513, 303966208),
          'ViT-L/14@336': (427944193, 304293888)}


def reference_counts():
  """OpenAI's counts from ../shared/reference when it is beside the checkout (CI), else
  the same figures kept above."""
  if not os.path.exists(REFERENCE):
    return PARAMS
  ref = json.load(open(REFERENCE))['models']
  return {n: (m['params'], m['visual_params']) for n, m in ref.items()}


@pytest.mark.parametrize('name', OPENAI_NAMES)
def test_openai_parameter_counts(name):
  shapes = param_shapes(model_config(name))
  total, visual = reference_counts()[name]
  params = shapes['params']
  assert count_params(params) == total
  assert count_params(params['visual']) == visual
  assert count_params(params['text']) + 1 == total - visual   # + logit_scale
  if name.startswith('RN'):
    # BatchNorm running mean/var live outside 'params' (not trainable).
    ref_bn = {'RN50': 53248, 'RN101': 105472, 'RN50x4': 109760, 'RN50x16': 193920,
              'RN50x64': 410624}[name]
    assert count_params(shapes['batch_stats']) == ref_bn


@pytest.mark.parametrize('name', ['ViT-B/32', 'RN50'])
def test_scan_does_not_change_parameter_count(name):
  plain = count_params(param_shapes(model_config(name))['params'])
  scanned = count_params(param_shapes(model_config(name, scan_layers=True))['params'])
  assert plain == scanned


def _tiny_inputs(cfg, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  size = cfg.vision.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  ctx, vocab = cfg.text.context_length, cfg.text.vocab_size
  tokens = np.zeros((batch, ctx), np.int32)
  for i in range(batch):
    n = 3 + i
    tokens[i, 0] = vocab - 2                       # start of text
    tokens[i, 1:n] = rng.integers(1, vocab - 2, n - 1)
    tokens[i, n] = vocab - 1                       # end of text (largest id, as CLIP's BPE)
  return jnp.asarray(images), jnp.asarray(tokens)


def _init(cfg, seed=0):
  return init_variables(build_model(cfg), cfg, jax.random.key(seed))


def _loss_fn(model, variables):
  @jax.jit
  def loss(params, images, tokens):
    img, txt, scale = model.apply({**variables, 'params': params}, images, tokens)
    logits = jnp.exp(scale) * img @ txt.T
    labels = jnp.arange(img.shape[0])
    lse_i = jax.nn.logsumexp(logits, axis=1) - logits[labels, labels]
    lse_t = jax.nn.logsumexp(logits, axis=0) - logits[labels, labels]
    return (lse_i.mean() + lse_t.mean()) / 2
  return loss


def test_tiny_forward_backward():
  cfg = model_config('tiny')
  model = build_model(cfg)
  variables = _init(cfg)
  images, tokens = _tiny_inputs(cfg)
  img, txt, scale = model.apply(variables, images, tokens)
  assert img.shape == txt.shape == (4, cfg.embed_dim)
  np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, np.log(1 / 0.07), rtol=1e-6)
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(model, variables)))(
      variables['params'], images, tokens)
  assert np.isfinite(loss)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  # Every parameter receives gradient (nothing is accidentally disconnected).
  assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_bfloat16_compute_is_close_to_float32():
  cfg32 = model_config('tiny')
  cfg16 = model_config('tiny', dtype='bfloat16')
  variables = _init(cfg32)
  images, tokens = _tiny_inputs(cfg32)
  out32 = jax.jit(build_model(cfg32).apply)(variables, images, tokens)
  out16 = jax.jit(build_model(cfg16).apply)(variables, images, tokens)
  # Parameters stay float32 under bfloat16 compute.
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
      _init(cfg16)['params']))
  for a, b in zip(out32[:2], out16[:2]):
    assert np.isfinite(b).all()
    assert b.dtype == jnp.float32   # features are returned in float32 for the loss
    np.testing.assert_allclose(a, b, atol=5e-2)
    cos = jnp.sum(a * b, axis=-1)
    assert float(cos.min()) > 0.99


def test_scan_matches_unrolled_with_same_weights():
  cfg = model_config('tiny')
  cfg_scan = model_config('tiny', scan_layers=True)
  variables = _init(cfg)
  scanned = {'params': stack_layers(variables['params'])}
  # Stacking gives exactly the tree the scanned model initialises.
  ref_shapes = jax.tree_util.tree_map(lambda x: x.shape, param_shapes(cfg_scan)['params'])
  assert jax.tree_util.tree_map(lambda x: x.shape, scanned['params']) == ref_shapes
  images, tokens = _tiny_inputs(cfg)
  out = jax.jit(build_model(cfg).apply)(variables, images, tokens)
  out_scan = jax.jit(build_model(cfg_scan).apply)(scanned, images, tokens)
  for a, b in zip(out, out_scan):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # And the round trip is exact.
  back = unstack_layers(scanned['params'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables['params'])


@pytest.mark.parametrize('policy, scan', [('full', False), ('dots', True),
                                          ('save_attn_out', True)])
def test_remat_keeps_outputs_and_gradients(policy, scan):
  cfg = model_config('tiny', scan_layers=scan)
  cfg_remat = model_config('tiny', scan_layers=scan, remat_policy=policy)
  variables = _init(cfg)
  images, tokens = _tiny_inputs(cfg)
  loss_a, grads_a = jax.jit(jax.value_and_grad(_loss_fn(build_model(cfg), variables)))(
      variables['params'], images, tokens)
  loss_b, grads_b = jax.jit(jax.value_and_grad(_loss_fn(build_model(cfg_remat), variables)))(
      variables['params'], images, tokens)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  # Equal up to float32 re-association (recomputed activations may fuse differently).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         grads_a,
                         grads_b)


def test_text_features_come_from_end_of_text_and_ignore_padding():
  cfg = model_config('tiny', text_pool='argmax')
  model = build_model(cfg)
  variables = _init(cfg)
  _, tokens = _tiny_inputs(cfg)
  eot = np.asarray(eot_positions(tokens, 'argmax', 0))
  np.testing.assert_array_equal(eot, [3, 4, 5, 6])
  encode = jax.jit(lambda t: model.apply(variables, t, method=model.encode_text))
  base = encode(tokens)
  # Junk after the end-of-text token cannot reach it through the causal mask.
  padded = np.asarray(tokens).copy()
  for i, p in enumerate(eot):
    padded[i, p + 1:] = np.random.default_rng(i).integers(1, 400, cfg.text.context_length - p - 1)
  np.testing.assert_allclose(encode(jnp.asarray(padded)), base, atol=1e-6)
  # Changing a token before the end-of-text token does change the features.
  changed = np.asarray(tokens).copy()
  changed[:, 1] = (changed[:, 1] + 1) % 500 + 1
  assert float(jnp.abs(encode(jnp.asarray(changed)) - base).max()) > 1e-4
  # The features are exactly the projected final state at the EOT position.
  _, state = model.apply(variables, tokens, method=model.encode_text,
                         capture_intermediates=lambda mdl, _: mdl.name == 'ln_final')
  ln_out = state['intermediates']['text']['ln_final']['__call__'][0]   # [B, width] at EOT
  expected = ln_out @ variables['params']['text']['text_projection']
  np.testing.assert_allclose(base, expected, atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_final_positions_shortcut_equals_the_full_last_layer(causal):
  """The last block run for the pooled tokens only = the whole stack, then those tokens."""
  stack = Transformer(layers=2, heads=4, causal=causal, activation='quick_gelu')
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 32))
  variables = stack.init(jax.random.PRNGKey(1), x)
  positions = jnp.array([0, 4, 8])
  full = jax.jit(stack.apply)(variables, x)                          # [B, T, width]
  picked = jax.jit(stack.apply)(variables, x, positions)             # [B, width]
  assert picked.shape == (3, 32)
  np.testing.assert_allclose(picked, full[jnp.arange(3), positions], atol=1e-5)
  # The shortcut's gradients reach every parameter as the full computation's do.
  grads = [jax.jit(jax.grad(lambda v, f=f: f(v).sum()))(variables) for f in (
      lambda v: stack.apply(v, x)[jnp.arange(3), positions],
      lambda v: stack.apply(v, x, positions))]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_eot_id_pooling_for_sentencepiece_style_vocabularies():
  tokens = jnp.array([[5, 9, 2, 0, 0], [5, 2, 7, 8, 9], [5, 6, 7, 8, 9]])
  np.testing.assert_array_equal(eot_positions(tokens, 'eot_id', 2), [2, 1, 4])
  # tiny's SentencePiece vocabulary: EOT id 3, padding 0 after it.
  cfg = model_config('tiny')
  model = build_model(cfg)
  variables = _init(cfg)
  encode = jax.jit(lambda t: model.apply(variables, t, method=model.encode_text))
  tokens = np.zeros((2, 16), np.int32)
  tokens[:, :4] = [[2, 50, 60, 3], [2, 50, 60, 3]]
  tokens[1, 4:] = 77                  # junk after EOT must not matter
  out = encode(jnp.asarray(tokens))
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def _resnet_cfg():
  cfg = model_config('RN50')
  cfg.vision.layers = (1, 1, 1, 1)
  cfg.vision.width = 8
  cfg.vision.heads = 4
  cfg.vision.image_size = 64
  cfg.text.layers = 1
  cfg.text.width = 32
  cfg.text.heads = 2
  cfg.embed_dim = 16
  return cfg


def test_modified_resnet_train_and_eval_modes():
  cfg = _resnet_cfg()
  model = build_model(cfg)
  variables = _init(cfg)
  assert 'batch_stats' in variables
  names = flatten_names(variables['params']['visual'])
  assert 'layer2_0/downsample_conv/kernel' in names and 'attnpool/q_proj/kernel' in names
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 64, 64, 3)).astype(np.float32))
  # Eval uses running statistics and is deterministic per sample.
  encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))
  feats = encode(variables, images)
  single = encode(variables, images[:1])
  np.testing.assert_allclose(feats[:1], single, atol=1e-5)
  # Train mode normalises with batch statistics and updates the running ones.
  feats_train, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'], method=model.encode_image))(variables, images)
  assert feats_train.shape == (3, 16) and np.isfinite(feats_train).all()
  before = variables['batch_stats']['visual']['bn1']['mean']
  after = updates['batch_stats']['visual']['bn1']['mean']
  assert float(jnp.abs(after - before).max()) > 0


def test_modified_resnet_remat_keeps_gradients():
  cfg = _resnet_cfg()
  cfg_remat = _resnet_cfg()
  cfg_remat.remat_policy = 'full'
  variables = _init(cfg)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32))

  def loss(model):
    return lambda p: jnp.sum(model.apply({**variables, 'params': p}, images,
                                         method=model.encode_image) ** 2)
  ga = jax.jit(jax.grad(loss(build_model(cfg))))(variables['params'])
  gb = jax.jit(jax.grad(loss(build_model(cfg_remat))))(variables['params'])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         ga, gb)


def test_every_parameter_has_logical_axis_names():
  cfg = model_config('tiny', scan_layers=True)
  boxed = build_model(cfg).init(jax.random.key(0), *_tiny_inputs(cfg, batch=1))
  leaves = jax.tree_util.tree_leaves(boxed['params'],
                                     is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
  # Scanned layers carry the 'layers' axis first.
  qkv = boxed['params']['visual']['transformer']['resblocks']['attn']['qkv']['kernel']
  assert qkv.names == ('layers', 'embed', 'qkv', 'heads', 'head_dim')


def test_attention_pool_heads_carry_the_heads_axis():
  """The attention pool's q/k/v outputs are (heads, head_dim) merged heads-major: 'heads'."""
  cfg = _resnet_cfg()
  boxed = jax.eval_shape(lambda r: build_model(cfg).init(r, *_tiny_inputs(cfg, batch=1)),
                         jax.random.key(0))
  pool = boxed['params']['visual']['attnpool']
  for name in ('q_proj', 'k_proj', 'v_proj'):
    assert pool[name]['kernel'].names == ('embed', 'heads')
    assert pool[name]['bias'].names == ('heads',)
  assert pool['c_proj']['kernel'].names == ('heads', 'proj')


def _numbers_in_code(path):
  """(line, value) of every int/float literal in a module's code (docstrings and comments
  are strings or nothing to the AST, so prose may name the numbers)."""
  tree = ast.parse(path.read_text())
  return [(node.lineno, node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and type(node.value) in (int, float)]


def test_openai_constants_are_written_only_in_their_module():
  package = pathlib.Path(clip_jax.__file__).parent
  home = pathlib.Path(openai_constants.__file__)
  ids = {openai_constants.VOCAB_SIZE, openai_constants.SOT_TOKEN_ID,
         openai_constants.EOT_TOKEN_ID}
  # Rounded spellings (2.6592) count too; 0.07 is the temperature the init is made from.
  floats = (openai_constants.LOGIT_SCALE_INIT, openai_constants.LOGIT_SCALE_MAX, 0.07)
  found = [f'{path.relative_to(package)}:{line}: {value!r}'
           for path in sorted(package.rglob('*.py')) if path != home
           for line, value in _numbers_in_code(path)
           if (type(value) is int and value in ids)
           or (type(value) is float and any(abs(value - f) < 1e-3 for f in floats))]
  assert not found, 'import these from clip_jax.models.openai_constants:\n' + '\n'.join(found)
  # The home itself states each of them.
  assert {value for _, value in _numbers_in_code(home)} >= ids | {openai_constants.CONTEXT_LENGTH}


def test_model_options_are_the_defaults_every_config_gets():
  options = ModelOptions()
  assert MODEL_DEFAULTS == dataclasses.asdict(options)
  assert options.logit_scale_init == openai_constants.LOGIT_SCALE_INIT
  assert options.eot_token_id == openai_constants.EOT_TOKEN_ID
  # A config without the options (an older config.json) builds with the same defaults.
  full = model_config('ViT-B/32')
  bare = ml_collections.ConfigDict({k: full[k] for k in ARCHITECTURE_KEYS})
  assert ModelOptions.from_config(bare) == options == ModelOptions.from_config(full)
  assert build_model(bare) == build_model(full)
