"""AdamW masks, multipliers, freezing and the schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import optim
from clip_jax.config import get_config, validate
from clip_jax.models.clip import param_shapes
from clip_jax.models.params import flatten_names

NOT_DECAYED_LEAVES = {'scale', 'bias', 'positional_embedding', 'class_embedding', 'logit_scale'}


def _trainable(arch):
  shapes = param_shapes(get_config(arch).model)
  return {'params': shapes['params'], 'loss_params': {'bias': jax.ShapeDtypeStruct((), jnp.float32)}}


@pytest.mark.parametrize('arch', ['ViT-B/32', 'RN50'])
def test_decay_mask_is_exactly_gains_biases_pos_class_and_temperature(arch):
  tree = _trainable(arch)
  mask = flatten_names(optim.decay_mask(get_config(arch).optim, tree))
  not_decayed = {n for n, decayed in mask.items() if not decayed}
  assert not_decayed == {n for n in mask if n.split('/')[-1] in NOT_DECAYED_LEAVES}
  # Spot checks by name, for the reader.
  assert 'params/logit_scale' in not_decayed and 'loss_params/bias' in not_decayed
  if arch == 'RN50':
    assert mask['params/visual/bn1/scale'] is False
    assert mask['params/visual/layer1_0/downsample_bn/bias'] is False
    assert mask['params/visual/attnpool/positional_embedding'] is False
    assert mask['params/visual/attnpool/q_proj/kernel'] is True
  else:
    assert mask['params/visual/class_embedding'] is False
    assert mask['params/visual/transformer/resblocks_0/attn/qkv/bias'] is False
    assert mask['params/visual/transformer/resblocks_0/ln_1/scale'] is False
    assert mask['params/visual/conv1/kernel'] is True
    assert mask['params/visual/proj'] is True
  assert mask['params/text/token_embedding'] is True        # decayed, as open_clip
  assert mask['params/text/text_projection'] is True
  assert mask['params/text/positional_embedding'] is False


def _toy_config():
  config = get_config('tiny')
  config.total_steps = 100
  config.optim.update(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0,
                      lr_multipliers=((r'^params/text/', 0.5),), freeze=(r'^params/visual/',))
  return config


def _toy_tree():
  ones = lambda *s: jnp.ones(s, jnp.float32)
  return {'params': {'visual': {'proj': ones(2, 2)}, 'text': {'text_projection': ones(2, 2)},
                     'logit_scale': jnp.float32(1.0)},
          'loss_params': {}}


def test_freezing_multipliers_and_decoupled_decay():
  config = _toy_config()
  tx = optim.make_optimizer(config)
  tree = _toy_tree()
  grads = jax.tree_util.tree_map(jnp.ones_like, tree)
  state = tx.init(tree)
  updates, state = jax.jit(tx.update)(grads, state, tree)
  flat = flatten_names(updates)
  # Frozen: no update and no Adam moments kept for it.
  np.testing.assert_array_equal(flat['params/visual/proj'], 0.0)
  mu_names = [n for n in flatten_names(state) if '/visual/' in n]
  assert mu_names == [], mu_names
  # First Adam step is lr * g/|g| = lr; decay adds lr * wd * w; the multiplier scales both.
  np.testing.assert_allclose(flat['params/text/text_projection'], -0.5 * 0.1 * (1 + 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(flat['params/logit_scale'], -0.1, rtol=1e-5)   # not decayed
  lines = optim.describe_param_groups(config, tree)
  row = next(line for line in lines if line.startswith('params/visual/proj'))
  assert row.split()[-3:] == ['yes', '1', 'yes']
  row = next(line for line in lines if line.startswith('params/text/text_projection'))
  assert row.split()[-3:] == ['yes', '0.5', 'no']
  assert any(line.startswith('parameters: ') and '4 frozen' in line for line in lines)


def test_grad_clipping_and_bfloat16_first_moment():
  config = _toy_config()
  config.optim.update(freeze=(), lr_multipliers=(), grad_clip_norm=1.0, mu_dtype='bfloat16',
                      weight_decay=0.0)
  tx = optim.make_optimizer(config)
  tree = _toy_tree()
  grads = jax.tree_util.tree_map(lambda x: 100 * jnp.ones_like(x), tree)
  state = tx.init(tree)
  mus = [x for n, x in flatten_names(state).items() if '.mu' in n or '/mu/' in n]
  assert mus and all(x.dtype == jnp.bfloat16 for x in mus)
  assert float(optim.trainable_norm(config.optim, grads)) == pytest.approx(300.0)
  updates, _ = tx.update(grads, state, tree)
  np.testing.assert_allclose(flatten_names(updates)['params/visual/proj'], -0.1, rtol=1e-2)


def open_clip_cosine_lr(base_lr, warmup_length, steps, step):
  """open_clip's training/scheduler.py `cosine_lr` (with its `_warmup_lr`), in float64."""
  if step < warmup_length:
    return base_lr * (step + 1) / warmup_length
  e, es = step - warmup_length, steps - warmup_length
  return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr


def test_schedule_is_open_clips_warmup_and_cosine():
  # The paper's run: peak 5e-4, 2,000 warmup steps, 390,625 steps, decay to 0.
  config = get_config('tiny')
  config.optim.update(learning_rate=5e-4, warmup_steps=2000, end_lr_factor=0.0)
  total = 390_625
  schedule = jax.jit(optim.learning_rate_schedule(config.optim, total_steps=total))
  warmup = np.asarray(schedule(jnp.arange(2000)), np.float64)
  expected = np.array([open_clip_cosine_lr(5e-4, 2000, total, s) for s in range(2000)])
  assert warmup[0] == np.float32(5e-4 / 2000) > 0                  # step 0 learns
  np.testing.assert_allclose(warmup, expected, rtol=1.2e-7, atol=0)   # within 1 float32 ulp
  steps = np.r_[2000:2100, 2000:total:997, total - 50:total]
  decay = np.asarray(schedule(jnp.asarray(steps)), np.float64)
  expected = np.array([open_clip_cosine_lr(5e-4, 2000, total, s) for s in steps])
  np.testing.assert_allclose(decay, expected, rtol=1e-6, atol=5e-4 * 1e-6)
  assert float(schedule(total + 1000)) == pytest.approx(0.0, abs=1e-12)   # stays at the end


def test_schedule_ends_at_end_lr_factor():
  config = get_config('tiny')
  config.optim.update(learning_rate=1.0, warmup_steps=10, end_lr_factor=0.1)
  schedule = optim.learning_rate_schedule(config.optim, total_steps=110)
  assert [float(schedule(s)) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0], rel=1e-7)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, rel=1e-6)     # half way down the cosine
  assert float(schedule(110)) == pytest.approx(0.1, rel=1e-6)
  config.optim.warmup_steps = 0
  schedule = optim.learning_rate_schedule(config.optim, total_steps=100)
  assert float(schedule(0)) == 1.0 and float(schedule(100)) == pytest.approx(0.1, rel=1e-6)


def _one_device_step(config, logit_scale=None):
  """(state before, state after one train step, metrics) of a small CLIP on one device."""
  from clip_jax import train_step
  from clip_jax.models.clip import build_model
  from clip_jax.sharding import make_mesh
  from test_train_step import make_batch
  model = build_model(config.model)
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state, shardings = train_step.create_train_state(config, model, mesh, jax.random.key(0))
  if logit_scale is not None:
    params = dict(state.params, logit_scale=jnp.float32(logit_scale))
    state = jax.device_put(state.replace(params=params), shardings)
  before = jax.device_get(state)
  step = train_step.make_train_step(config, model, mesh, shardings)
  state, metrics = step(state, make_batch(config))
  return before, jax.device_get(state), jax.device_get(metrics)


def _warmup_config():
  from test_train_step import small_config
  config = small_config()
  config.optim.update(learning_rate=5e-4, warmup_steps=2000)     # the paper's warmup
  return config


def test_first_step_of_a_warmup_changes_every_weight():
  before, after, metrics = _one_device_step(_warmup_config())
  assert metrics['learning_rate'] == np.float32(5e-4 / 2000)
  old, new = flatten_names(before.params), flatten_names(after.params)
  unchanged = [n for n in old if np.array_equal(old[n], new[n])]
  assert unchanged == []


def test_temperature_is_clamped_to_1_and_100_after_the_update():
  tx = optim.make_optimizer(_toy_config())
  ln100 = np.float32(math.log(100.0))

  def step(logit_scale, grad):
    tree = _toy_tree()
    tree['params']['logit_scale'] = jnp.float32(logit_scale)
    grads = jax.tree_util.tree_map(jnp.zeros_like, tree)
    grads['params']['logit_scale'] = jnp.float32(grad)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    return np.float32(optax.apply_updates(tree, updates)['params']['logit_scale'])

  # Outside the range: projected onto the bound, whatever the gradient says.
  assert step(-0.7, +1.0) == 0.0 and np.exp(step(-0.7, -1.0)) == 1.0
  assert step(5.3, -1.0) == ln100 and np.exp(step(5.3, +1.0)) == pytest.approx(100.0, rel=1e-6)
  # At a bound the gradient still acts: pointing inwards it moves the scale back
  # (lr 0.1, Adam's first step is lr x sign), pointing outwards it leaves it at the bound.
  assert step(0.0, -1.0) == pytest.approx(0.1, rel=1e-5) and step(0.0, +1.0) == 0.0
  assert step(ln100, +1.0) == pytest.approx(ln100 - 0.1, rel=1e-5) and step(ln100, -1.0) == ln100
  assert step(2.0, +1.0) == pytest.approx(1.9, rel=1e-5)             # inside: plain AdamW


@pytest.mark.parametrize('start, temperature', [(-0.5, 1.0), (5.0, 100.0)])
def test_train_step_keeps_the_temperature_within_1_and_100(start, temperature):
  # The same program as above (JAX's compilation cache): only the start differs.
  before, after, metrics = _one_device_step(_warmup_config(), logit_scale=start)
  assert float(before.params['logit_scale']) == np.float32(start)
  assert float(metrics['temperature']) == pytest.approx(temperature, rel=1e-6)
  assert np.isfinite(metrics['loss']) and metrics['grad_norm'] > 0


def test_bad_optim_config_names_the_key():
  config = get_config('tiny')
  config.optim.freeze = ('[unclosed',)
  with pytest.raises(ValueError, match=r'config\.optim\.freeze'):
    optim.make_optimizer(config)
  config = get_config('tiny')
  config.optim.mu_dtype = 'float8'
  with pytest.raises(ValueError, match=r'config\.optim\.mu_dtype'):
    optim.make_optimizer(config)
  config = get_config('tiny')
  config.optim.lr_multipliers = (('^params/', 1.0, 2.0),)
  with pytest.raises(ValueError, match=r'config\.optim\.lr_multipliers'):
    optim.make_optimizer(config)


def test_validate_names_the_bad_training_key():
  for key, value, match in [('loss.name', 'hinge', r'config\.loss\.name'),
                            ('train.micro_batches', 3, r'config\.train\.micro_batches'),
                            ('optim.warmup_steps', -1, r'config\.optim\.warmup_steps'),
                            ('mesh.param_rules', (('(', ''),), r'config\.mesh\.param_rules')]:
    config = get_config('tiny')
    section, name = key.split('.')
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
      validate(config)
  validate(get_config('tiny'))
