"""FLIP patch masking, positional embeddings at another patch grid, shorter texts.

Each feature is checked against a reference built from the towers' own layers: the
masked ViT equals the plain encoder run on the kept tokens; a model at another image
size equals one built for that size whose stored embedding is the resampled one (and
the resampling equals torch's, as timm and open_clip call it); a short text equals a
model built with that context length.
"""

import functools

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax import checkpoint
from clip_jax import config as base
from clip_jax.convert import infer
from clip_jax.models import build_model, init_variables, model_config
from clip_jax.models import layers, vit
from clip_jax.models.architectures import ARCHITECTURES, VISION_OPTIONS
from clip_jax.models.clip import TowerEncoder, param_shapes, validate_model_config
from clip_jax.models.layers import Transformer, layer_norm
from clip_jax.models.params import stack_layers, unstack_layers

# tiny: 32 px images, 8-px patches -> a 4 x 4 grid of 16 patch tokens, width 64, 2 layers.
PATCHES = 16


def _images(batch=4, size=32, seed=0, width=None):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, size, width or size, 3)).astype(np.float32))


def _tokens(batch=4, length=16, seed=0):
  """tiny's SentencePiece layout: start 2, words, end-of-text 3, padding 0."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, length), np.int32)
  for i in range(batch):
    n = 2 + i
    tokens[i, 0] = 2
    tokens[i, 1:n] = rng.integers(4, 500, n - 1)
    tokens[i, n] = 3
  return jnp.asarray(tokens)


def _model(**options):
  cfg = model_config('tiny', **options)
  return cfg, build_model(cfg)


def _variables(cfg, seed=0):
  return init_variables(build_model(cfg), cfg, jax.random.key(seed))


def _encode(model, variables, images, mask_ratio=0.0, key=None):
  rngs = {} if key is None else {'mask': key}
  return model.apply(variables, images, mask_ratio=mask_ratio, rngs=rngs,
                     method=model.encode_image)


def _reference_image_encoder(cfg, params, images, kept=None):
  """The ViT recomposed from its layers: patches + pos, then (if `kept` [B, K] patch
  indices) the class token and those patches only, then the unmasked encoder."""
  return jax.jit(functools.partial(_reference_encoder, cfg))(params, images, kept)


def _reference_encoder(cfg, params, images, kept):
  v, visual = cfg.vision, params['visual']
  x = vit.PatchEmbedding(v.patch_size, v.width, jnp.float32).apply(
      {'params': visual['conv1']}, images)
  cls = jnp.broadcast_to(visual['class_embedding'], (x.shape[0], 1, v.width))
  x = jnp.concatenate([cls, x], axis=1) + visual['positional_embedding']
  if kept is not None:
    x = jnp.concatenate([x[:, :1], jnp.take_along_axis(x[:, 1:], kept[..., None], 1)], 1)
  x = layer_norm(jnp.float32, 'ln_pre').apply({'params': visual['ln_pre']}, x)
  x = Transformer(v.layers, v.heads, causal=False, activation=cfg.activation).apply(
      {'params': visual['transformer']}, x, jnp.zeros((x.shape[0],), jnp.int32))
  x = layer_norm(jnp.float32, 'ln_post').apply({'params': visual['ln_post']}, x)
  return x @ visual['proj']


def _recording_keep_indices(monkeypatch):
  """Records the patch indices the model draws (eager calls only)."""
  drawn = []
  draw = vit.random_keep_indices

  def record(*args):
    drawn.append(draw(*args))
    return drawn[-1]
  monkeypatch.setattr(vit, 'random_keep_indices', record)
  return drawn


# --- the kept count and the draw ----------------------------------------------------------

def test_kept_count_is_static_and_rounded():
  assert vit.kept_patches(196, 0.5) == 98 and vit.kept_patches(196, 0.75) == 49
  assert vit.kept_patches(196, 0.0) == 196
  assert vit.kept_patches(49, 0.5) == 24          # round(24.5): Python rounds half to even
  assert vit.kept_patches(4, 0.9) == 1            # never zero patches
  for bad in (1.0, -0.1, True, '0.5', None):
    with pytest.raises(ValueError, match=r'mask_ratio: expected a fraction in \[0, 1\)'):
      vit.kept_patches(196, bad)


def test_keep_indices_are_distinct_sorted_and_per_example():
  kept = np.asarray(vit.random_keep_indices(jax.random.key(0), 64, PATCHES, 5))
  assert kept.shape == (64, 5) and kept.dtype == np.int32
  assert ((kept >= 0) & (kept < PATCHES)).all()
  assert (np.diff(kept, axis=1) > 0).all()        # distinct, in image order
  assert len({tuple(row) for row in kept}) > 32   # rows draw independently
  # Every patch is kept about equally often (5/16 of the rows each).
  counts = np.bincount(kept.ravel(), minlength=PATCHES)
  assert counts.min() > 0 and counts.max() < 64
  again = vit.random_keep_indices(jax.random.key(0), 64, PATCHES, 5)
  np.testing.assert_array_equal(kept, again)
  other = vit.random_keep_indices(jax.random.key(1), 64, PATCHES, 5)
  assert (np.asarray(other) != kept).any()


# --- mask 0 is the plain model; masking is the plain encoder on the kept tokens ------------

@pytest.mark.parametrize('scan', [False, True])
def test_mask_zero_is_the_plain_model_and_needs_no_rng(scan):
  cfg, model = _model(scan_layers=scan)
  variables = _variables(cfg)
  images, tokens = _images(), _tokens()
  plain = jax.jit(model.apply)(variables, images, tokens)
  masked0 = jax.jit(lambda v, x, t: model.apply(v, x, t, mask_ratio=0.0))(
      variables, images, tokens)
  for a, b in zip(plain, masked0):
    np.testing.assert_array_equal(a, b)
  if not scan:
    # ... which is the recomposed reference encoder on every token.
    ref = _reference_image_encoder(cfg, variables['params'], images)
    np.testing.assert_allclose(_encode(model, variables, images), ref, atol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_masked_encoder_is_the_plain_encoder_on_the_kept_tokens(scan, monkeypatch):
  _, model = _model(scan_layers=scan)
  plain_params = _variables(model_config('tiny'))['params']
  variables = {'params': stack_layers(plain_params) if scan else plain_params}
  images = _images()
  drawn = _recording_keep_indices(monkeypatch)
  out = _encode(model, variables, images, 0.5, jax.random.key(7))
  (kept,) = drawn
  assert kept.shape == (4, vit.kept_patches(PATCHES, 0.5))
  ref = _reference_image_encoder(model_config('tiny'), plain_params, images, kept)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # It is not the unmasked output, nor another draw's.
  assert float(jnp.abs(out - _encode(model, variables, images)).max()) > 1e-3
  wrong = _reference_image_encoder(model_config('tiny'), plain_params, images,
                                   (kept + 1) % PATCHES)
  assert float(jnp.abs(out - wrong).max()) > 1e-3


def test_same_key_same_mask_other_key_other_mask():
  cfg, model = _model()
  variables = _variables(cfg)
  images = _images()
  run = jax.jit(lambda v, x, key: _encode(model, v, x, 0.5, key))
  a = run(variables, images, jax.random.key(3))
  np.testing.assert_array_equal(a, run(variables, images, jax.random.key(3)))
  b = run(variables, images, jax.random.key(4))
  assert float(jnp.abs(a - b).max()) > 1e-3
  # The whole model passes the ratio to the image tower; the text tower is untouched.
  img, txt, _ = jax.jit(lambda v, x, t, key: model.apply(v, x, t, mask_ratio=0.5,
                                                         rngs={'mask': key}))(
      variables, images, _tokens(), jax.random.key(3))
  np.testing.assert_allclose(img, a / jnp.linalg.norm(a, axis=-1, keepdims=True), atol=1e-6)
  np.testing.assert_array_equal(txt, jax.jit(model.apply)(variables, images, _tokens())[1])


def test_masking_needs_the_mask_rng():
  cfg, model = _model()
  with pytest.raises(flax.errors.InvalidRngError, match='mask'):
    _encode(model, _variables(cfg), _images(), 0.5)


@pytest.mark.parametrize('ratio, tokens', [(0.5, 9), (0.75, 5), (0.0, 17)])
def test_encoder_runs_on_a_static_number_of_tokens(ratio, tokens):
  cfg, model = _model()
  variables = _variables(cfg)

  def ln_pre_output(v, x, key):
    _, state = model.apply(v, x, mask_ratio=ratio, rngs={'mask': key},
                           method=model.encode_image,
                           capture_intermediates=lambda mdl, _: mdl.name == 'ln_pre')
    return state['intermediates']['visual']['ln_pre']['__call__'][0]
  shape = jax.eval_shape(ln_pre_output, variables, _images(), jax.random.key(0)).shape
  assert shape == (4, tokens, cfg.vision.width)
  # The compiled step's attention logits are [B, heads, tokens, tokens].
  jaxpr = str(jax.make_jaxpr(lambda v, x, key: _encode(model, v, x, ratio, key))(
      variables, _images(), jax.random.key(0)))
  assert f'f32[4,2,{tokens},{tokens}]' in jaxpr


# --- gradients, scan and remat --------------------------------------------------------------

def test_masked_gradients_flow_and_scan_remat_agree_with_unrolled():
  images, key = _images(), jax.random.key(5)

  def loss(model):
    return lambda p: jnp.sum(_encode(model, {'params': p}, images, 0.75, key) ** 2)
  cfg = model_config('tiny')
  params = _variables(cfg)['params']
  value, grads = jax.jit(jax.value_and_grad(loss(build_model(cfg))))(params)
  leaves = jax.tree_util.tree_leaves(grads['visual'])
  assert all(np.isfinite(g).all() and float(jnp.abs(g).sum()) > 0 for g in leaves)
  for options in (dict(remat_policy='full'), dict(scan_layers=True, remat_policy='dots')):
    other = build_model(model_config('tiny', **options))
    p = stack_layers(params) if options.get('scan_layers') else params
    value_b, grads_b = jax.jit(jax.value_and_grad(loss(other)))(p)
    np.testing.assert_allclose(value, value_b, rtol=1e-5)
    if options.get('scan_layers'):
      grads_b = unstack_layers(grads_b)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           grads['visual'], grads_b['visual'])


# --- a batch-sharded input stays batch-sharded ----------------------------------------------

def test_batch_sharded_masking_equals_one_device_without_collectives():
  cfg, model = _model()
  variables = _variables(cfg)
  images, key = _images(batch=16), jax.random.key(9)
  single = jax.jit(lambda v, x, k: _encode(model, v, x, 0.5, k))(variables, images, key)
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  batch_sharded, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  run = jax.jit(lambda v, x, k: _encode(model, v, x, 0.5, k),
                in_shardings=(replicated, batch_sharded, replicated),
                out_shardings=batch_sharded)
  sharded_images = jax.device_put(images, batch_sharded)
  out = run(jax.device_put(variables, replicated), sharded_images, key)
  np.testing.assert_allclose(out, single, atol=1e-6)
  assert out.sharding.is_equivalent_to(batch_sharded, out.ndim)
  # Each device gathers its own examples' tokens: no data moves between devices.
  hlo = run.lower(variables, sharded_images, key).compile().as_text()
  for collective in ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce'):
    assert collective not in hlo, collective


# --- configuration: the key, its checks, who runs unmasked ---------------------------------

def test_mask_ratio_is_a_vision_option_of_every_config_not_of_the_zoo():
  for name, entry in ARCHITECTURES.items():
    assert 'mask_ratio' not in entry['vision']
    assert model_config(name).vision.mask_ratio == VISION_OPTIONS['mask_ratio'] == 0.0
  config = base.get_config('tiny')
  config.model.vision.mask_ratio = 0.75
  base.validate(config)


@pytest.mark.parametrize('arch, ratio, message', [
    ('tiny', 1.0, r'expected a fraction in \[0, 1\), got 1\.0'),
    ('tiny', -0.25, r'expected a fraction in \[0, 1\), got -0\.25'),
    ('tiny', 'half', r"got 'half'"),
    ('tiny', True, r'got True'),
    ('RN50', 0.5, r"only a ViT has; vision.type='resnet'"),
])
def test_bad_mask_ratio_names_the_key(arch, ratio, message):
  cfg = model_config(arch).to_dict()     # a plain dict: ConfigDict would refuse a str
  cfg['vision']['mask_ratio'] = ratio
  with pytest.raises(ValueError, match=r'^config\.model\.vision\.mask_ratio: .*' + message):
    validate_model_config(cfg)
  if isinstance(ratio, float):           # the experiment config checks it before training
    config = base.get_config(arch)
    config.model.vision.mask_ratio = ratio
    with pytest.raises(ValueError, match=r'config\.model\.vision\.mask_ratio'):
      base.validate(config)


def test_resnet_tower_refuses_masking():
  cfg = model_config('RN50')
  cfg.vision.update(layers=(1, 1, 1, 1), width=8, heads=4, image_size=64)
  cfg.text.update(layers=1, width=32, heads=2)
  validate_model_config(cfg)                      # mask 0 is fine
  model = build_model(cfg)
  variables = param_shapes(cfg)                   # shapes only: nothing is computed
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  features = jax.eval_shape(lambda v, x: _encode(model, v, x), variables, images)
  assert features.shape == (2, cfg.embed_dim)
  with pytest.raises(ValueError, match=r'config\.model\.vision\.mask_ratio: 0\.5 .*ViT'):
    jax.eval_shape(lambda v, x: _encode(model, v, x, 0.5, jax.random.key(0)), variables, images)


def test_resnet_at_another_image_size_resamples_its_attention_pool_embedding():
  """A ModifiedResNet built for 64 px on 96 px images (a CLIPA stage) = one built for 96 px
  whose attention-pool embedding is the stored 2x2 grid resampled to 3x3."""
  cfg = model_config('RN50')
  cfg.vision.update(layers=(1, 1, 1, 1), width=8, heads=4, image_size=64)
  cfg.text.update(layers=1, width=32, heads=2)
  model = build_model(cfg)
  variables = init_variables(model, cfg, jax.random.key(0))
  images = _images(batch=2, size=96)
  out = jax.jit(lambda v, x: _encode(model, v, x))(variables, images)
  native = model_config('RN50')
  native.vision.update(layers=(1, 1, 1, 1), width=8, heads=4, image_size=96)
  native.text.update(layers=1, width=32, heads=2)
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  pool = params['visual']['attnpool']
  pool['positional_embedding'] = layers.resample_positional_embedding(
      pool['positional_embedding'], (2, 2), (3, 3))
  ref = _encode(build_model(native), dict(variables, params=params), images)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_evaluation_runs_unmasked_whatever_the_training_ratio():
  """The ratio is the train step's: a model built from a config with mask_ratio 0.75
  encodes (TowerEncoder: evaluation, embed, ClipModel) every patch, with no RNG."""
  masked_cfg = model_config('tiny')
  masked_cfg.vision.mask_ratio = 0.75
  variables = _variables(masked_cfg)
  plain = build_model(model_config('tiny'))
  encoder = TowerEncoder(build_model(masked_cfg), 'image')
  np.testing.assert_array_equal(jax.jit(encoder)(variables, _images()),
                                jax.jit(TowerEncoder(plain, 'image'))(variables, _images()))


def test_architecture_comparisons_ignore_the_mask_ratio(tmp_path):
  """A workdir resumes with another ratio (or from a config.json older than the key), and
  a converted zoo model is still recognised as the zoo entry."""
  config = base.get_config('tiny')
  config.model.vision.mask_ratio = 0.5
  checkpoint.write_config(tmp_path, config)
  checkpoint.check_compatible(tmp_path, base.get_config('tiny'))
  older = base.get_config('tiny')
  del older.model.vision['mask_ratio']
  checkpoint.check_compatible(tmp_path, older)
  wider = base.get_config('tiny')
  wider.model.vision.width = 32
  with pytest.raises(ValueError, match='config.model.vision'):
    checkpoint.check_compatible(tmp_path, wider)
  assert infer.is_zoo_architecture(config.model)
  assert infer.build_config(ARCHITECTURES['ViT-B/32']).name == 'ViT-B/32'
  validate_model_config(older.model)      # a config without the key: ratio 0


# --- positional embeddings at another patch grid ---------------------------------------------

def test_same_grid_keeps_the_stored_embedding():
  pos = jnp.arange(17 * 4, dtype=jnp.float32).reshape(17, 4)
  assert layers.resample_positional_embedding(pos, (4, 4), (4, 4)) is pos


@pytest.mark.parametrize('grid, new_grid', [((7, 7), (14, 14)), ((14, 14), (7, 7)),
                                            ((4, 4), (6, 6)), ((4, 4), (2, 3)),
                                            ((5, 5), (8, 3))])
def test_resampling_equals_torch_bicubic_as_timm_calls_it(grid, new_grid):
  """timm's resample_abs_pos_embed / open_clip's resize_pos_embed defaults."""
  width = 8
  pos = np.random.default_rng(0).normal(size=(1 + grid[0] * grid[1], width)).astype(np.float32)
  ours = np.asarray(layers.resample_positional_embedding(jnp.asarray(pos), grid, new_grid))
  patches = torch.from_numpy(pos[1:]).reshape(1, *grid, width).permute(0, 3, 1, 2)
  theirs = F.interpolate(patches, size=new_grid, mode='bicubic', align_corners=False,
                         antialias=True).permute(0, 2, 3, 1).reshape(-1, width).numpy()
  assert ours.shape == (1 + new_grid[0] * new_grid[1], width)
  np.testing.assert_array_equal(ours[0], pos[0])   # the class token's row is kept
  np.testing.assert_allclose(ours[1:], theirs, atol=1e-5)


@pytest.mark.parametrize('size', [16, 48])
def test_other_image_size_is_the_model_built_for_it_with_the_resampled_embedding(size):
  """tiny at 16 px (grid 2) or 48 px (grid 6) = a tiny built for that size whose stored
  embedding is the resampled one: resampling is the only change."""
  cfg, model = _model()
  variables = _variables(cfg)
  images = _images(size=size)
  out = jax.jit(lambda v, x: _encode(model, v, x))(variables, images)
  native = model_config('tiny')
  native.vision.image_size = size
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  grid = size // cfg.vision.patch_size
  params['visual']['positional_embedding'] = layers.resample_positional_embedding(
      variables['params']['visual']['positional_embedding'], (4, 4), (grid, grid))
  ref = _encode(build_model(native), {'params': params}, images)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert float(jnp.abs(out - _encode(model, variables, _images(size=32))).max()) > 1e-3


def test_other_image_size_masks_its_own_grid_and_trains_the_stored_embedding():
  cfg, model = _model()
  params = _variables(cfg)['params']
  images, key = _images(size=16, width=24), jax.random.key(0)    # a 2 x 3 grid, 6 patches

  def loss(p):
    return jnp.sum(_encode(model, {'params': p}, images, 0.5, key) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  pos_grad = grads['visual']['positional_embedding']
  assert pos_grad.shape == (PATCHES + 1, cfg.vision.width)
  assert float(jnp.abs(pos_grad).sum()) > 0
  _, state = model.apply({'params': params}, images, mask_ratio=0.5, rngs={'mask': key},
                         method=model.encode_image,
                         capture_intermediates=lambda mdl, _: mdl.name == 'ln_pre')
  assert state['intermediates']['visual']['ln_pre']['__call__'][0].shape == (4, 4, 64)


def test_images_smaller_than_a_patch_are_refused():
  cfg, model = _model()
  with pytest.raises(ValueError, match=r'\(4, 4, 32, 3\) are smaller than one 8-pixel patch'):
    _encode(model, _variables(cfg), _images(size=4, width=32))


# --- shorter texts --------------------------------------------------------------------------

@pytest.mark.parametrize('pool', ['eot_id', 'argmax'])
def test_short_text_is_the_model_built_for_that_length(pool):
  cfg, model = _model(text_pool=pool)
  variables = _variables(cfg)
  tokens = _tokens(length=8)
  if pool == 'argmax':
    tokens = jnp.where(tokens == 3, cfg.text.vocab_size - 1, tokens)
  encode = lambda m, v, t: m.apply(v, t, method=m.encode_text)
  out = jax.jit(lambda v, t: encode(model, v, t))(variables, tokens)
  short = model_config('tiny', text_pool=pool)
  short.text.context_length = 8
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  params['text']['positional_embedding'] = variables['params']['text']['positional_embedding'][:8]
  np.testing.assert_allclose(out, encode(build_model(short), {'params': params}, tokens),
                             atol=1e-5)
  # Padded to the full context, the same texts give the same features (causal mask).
  padded = jnp.pad(tokens, ((0, 0), (0, cfg.text.context_length - 8)))
  np.testing.assert_allclose(out, encode(model, variables, padded), atol=1e-5)


def test_text_longer_than_the_context_is_refused():
  cfg, model = _model()
  with pytest.raises(ValueError, match=r'17 tokens per text, more than '
                                       r'config\.model\.text\.context_length 16'):
    model.apply(_variables(cfg), _tokens(length=17), method=model.encode_text)
