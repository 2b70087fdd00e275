"""Stage schedules (config.train.stages): FLIP patch masking and CLIPA's reduced image size
and text length, each stage compiled once, the input stream following the stage, exact
resumes in the middle of a stage; masked GradCache; the truncation of texts."""

import contextlib
import io
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import checkpoint, train, train_step
from clip_jax.data import pipeline, shards, tokenizers
from clip_jax.models.clip import build_model, dummy_inputs
from clip_jax.models.params import flatten_names
from clip_jax.sharding import make_mesh
from test_data_pipeline import data_config, make_records
from test_losses import reference_loss
from test_train import data_dir, tiny_config  # noqa: F401  (data_dir: the module fixture)
from test_train_step import assert_trees_close, make_batch, small_config

# tiny: 32 px images in 8 px patches (a 4 x 4 grid), 16 text tokens, eot id 3.
THREE_STAGES = ((2, 0.5, 16, 8), (4, 0.0, 16, 16), (6, 0.0, 32, 16))


# --- the texts ---------------------------------------------------------------------------

def test_truncation_equals_the_tokenizer_at_the_shorter_context():
  """Tokenised at 77 then truncated to L is what the tokenizer itself makes at context L
  (OpenAI's truncate=True): the end-of-text token is kept as the last token."""
  texts = ['a', 'a photo of a dog', 'a red circle above a blue square on a grey field, '
           'drawn with thick strokes and soft shadows', '']
  full = tokenizers.ClipBpeTokenizer(context_length=77)
  for length in (2, 5, 8, 77):
    expected = tokenizers.ClipBpeTokenizer(context_length=length)(texts)
    got = pipeline.truncate_tokens(full(texts), length, full.eot_token_id)
    np.testing.assert_array_equal(got, expected, err_msg=f'length {length}')
  short = pipeline.truncate_tokens(full(texts), 5, full.eot_token_id)
  assert (short[2] != 0).all() and short[2, -1] == full.eot_token_id   # cut: eot last
  assert list(short[0]) == list(full(texts)[0, :5])                    # short enough: as is


# --- the input stream across a stage switch ----------------------------------------------

@pytest.fixture(scope='module')
def shard_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('stage_tfrecords')
  shards.write_tfrecord_shards(make_records(), str(folder), num_shards=6)
  return folder


def test_stream_switched_at_a_stage_goes_on_with_the_next_samples(shard_dir):
  """3 batches at 32 px / 16 tokens, then a stream rebuilt at 16 px / 8 tokens from the
  position reached: the samples (unique labels) go on with no repeat or gap, and the new
  batches equal those of a stream at the new settings from the start, pixel for pixel."""
  bpe = tokenizers.ClipBpeTokenizer(context_length=16)
  config = data_config(f'{shard_dir}/*.tfrecord')
  make = lambda **kw: pipeline.make_train_iterator(config, bpe, process_index=0,  # noqa: E731
                                                   process_count=1, **kw)
  straight = make()
  reference = [next(straight) for _ in range(6)]
  straight.close()
  first = make()
  before = [next(first) for _ in range(3)]
  position = first.state_dict()
  first.close()
  switched = make(state=position, image_size=16, text_length=8)
  after = [next(switched) for _ in range(3)]
  switched.close()
  labels = lambda batches: [int(x) for b in batches for x in b['label']]  # noqa: E731
  assert labels(before + after) == labels(reference)
  assert switched.state_dict()['emitted'] == 6 * config.batch_size
  assert {b['image'].shape for b in after} == {(4, 16, 16, 3)}
  assert {b['text'].shape for b in after} == {(4, 8)}
  small = make(image_size=16, text_length=8)
  small_reference = [next(small) for _ in range(6)][3:]
  small.close()
  for got, expected in zip(after, small_reference):
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['text'], expected['text'])
  for got, full in zip(after, reference[3:]):
    np.testing.assert_array_equal(got['text'],
                                  pipeline.truncate_tokens(full['text'], 8, bpe.eot_token_id))


# --- the train step ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('micro_batches', [1, 2])
def test_masked_step_gradients_equal_the_masked_batch_differentiated_whole(micro_batches):
  """The masked loss and gradient, full batch and GradCache (8 data-parallel devices),
  against jax.grad of the loss of the whole batch whose micro-batches are masked with the
  step's keys (train_step.micro_batch_keys), on one device. The recomputation of
  GradCache must use the embedding pass's masks for the two to agree; another key gives
  another loss (the mask is in effect)."""
  config = small_config(micro_batches=micro_batches)
  model = build_model(config.model)
  params = jax.jit(model.init)(jax.random.key(0), *dummy_inputs(config.model))['params']
  params = jax.device_get(nn.meta.unbox(params))
  batch = make_batch(config)
  key, ratio = train_step.mask_key(config.seed, 7), 0.5

  @jax.jit
  def reference(params, key):
    keys = [key] if micro_batches == 1 else list(train_step.micro_batch_keys(key, micro_batches))
    split = lambda x: x.reshape(x.shape[0] // micro_batches, micro_batches,  # noqa: E731
                                *x.shape[1:]).swapaxes(0, 1)   # row k*M + m -> micro-batch m
    images, texts = split(batch['image']), split(batch['text'])
    outputs = [model.apply({'params': params}, images[m], texts[m], train=True,
                           mask_ratio=ratio, rngs={train_step.MASK_RNG: keys[m]})
               for m in range(micro_batches)]
    merge = lambda xs: jnp.stack(xs, 1).reshape(-1, xs[0].shape[-1])  # noqa: E731
    return reference_loss('softmax', merge([o[0] for o in outputs]),
                          merge([o[1] for o in outputs]), params['logit_scale'], 0.0)
  ref_loss, ref_grads = jax.value_and_grad(reference)(params, key)

  grad_fn = jax.jit(train_step.make_grad_fn(config, model, make_mesh((8, 1, 1)),
                                            mask_ratio=ratio))
  trainable = {'params': params, 'loss_params': {}}
  loss, _, _, grads = grad_fn(trainable, {}, batch, key)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  assert_trees_close(jax.device_get(grads['params']), jax.device_get(ref_grads))
  other = reference(params, train_step.mask_key(config.seed, 8))
  assert abs(float(other) - float(ref_loss)) > 1e-4
  with pytest.raises(ValueError, match='needs a mask key'):
    grad_fn(trainable, {}, batch)


def test_mask_key_is_a_function_of_seed_and_step():
  same = jax.random.key_data(train_step.mask_key(0, 5)), jax.random.key_data(
      train_step.mask_key(0, jnp.int32(5)))
  np.testing.assert_array_equal(*same)
  assert not np.array_equal(jax.random.key_data(train_step.mask_key(0, 5)),
                            jax.random.key_data(train_step.mask_key(0, 6)))
  assert not np.array_equal(jax.random.key_data(train_step.mask_key(0, 5)),
                            jax.random.key_data(train_step.mask_key(1, 5)))


# --- the trainer -------------------------------------------------------------------------

def record_steps(monkeypatch, interrupt_at=()):
  """Wraps the trainer's make_train_step: records each built (jitted) step and, per call,
  (step number, image shape, text rows); sends this process SIGTERM (the trainer's
  preemption notice) after the steps in `interrupt_at`."""
  built, calls = [], []
  real = train.make_train_step

  def make_train_step(*args, **kwargs):
    jitted = real(*args, **kwargs)
    built.append((kwargs.get('mask_ratio', 0.0), jitted))

    def step(state, batch):
      number = int(state.step) + 1
      calls.append((number, batch['image'].shape, np.asarray(batch['text'])))
      state, metrics = jitted(state, batch)
      if number in interrupt_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics
    return step

  monkeypatch.setattr(train, 'make_train_step', make_train_step)
  return built, calls


def final_params(workdir):
  return flatten_names(checkpoint.load_model(workdir)[1]['params'])


def assert_same_run(workdir, reference):
  assert train.loss_history(str(workdir)) == train.loss_history(str(reference))
  got, expected = final_params(workdir), final_params(reference)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow
def test_a_stage_of_the_default_settings_is_the_default_run(
    tmp_path, data_dir, capsys):  # noqa: F811
  """stages=((total, 0, image size, context)) trains bit for bit as no stages at all."""
  train.train_and_evaluate(tiny_config(data_dir, total_steps=3), str(tmp_path / 'default'))
  capsys.readouterr()
  staged = tiny_config(data_dir, total_steps=3, train__stages=((3, 0.0, 32, 16),))
  train.train_and_evaluate(staged, str(tmp_path / 'staged'))
  assert 'stage 1/1 from step 1: mask 0.0, 32 px, 16 tokens' in capsys.readouterr().out
  assert sorted(train.loss_history(str(tmp_path / 'staged'))) == [1, 2, 3]
  assert_same_run(tmp_path / 'staged', tmp_path / 'default')


def test_dry_run_shows_the_stages_and_a_bad_stage_stops_before_training(
    tmp_path, data_dir, capsys):  # noqa: F811
  config = tiny_config(data_dir, total_steps=6, train__stages=THREE_STAGES)
  train.train_and_evaluate(config, str(tmp_path / 'dry'), dry_run=True)
  assert ('6 steps in 3 stages (steps 1-2: mask 0.5, 16 px, 8 tokens; steps 3-4: mask 0.0, '
          '16 px, 16 tokens; steps 5-6: mask 0.0, 32 px, 16 tokens)') in capsys.readouterr().out
  config.train.stages = ((2, 0.5, 16, 8), (4, 0.0, 16, 16))    # ends before total_steps
  with pytest.raises(ValueError, match=r'config\.train\.stages\[1\]: until_step 4; the '
                     r'last stage must end at config\.total_steps=6'):
    train.train_and_evaluate(config, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad' / 'checkpoints').exists()


@pytest.fixture(scope='module')
def three_stages(tmp_path_factory, data_dir):  # noqa: F811
  """THREE_STAGES trained straight through, its steps recorded: (config, workdir, console
  output, built steps, calls)."""
  workdir = str(tmp_path_factory.mktemp('three_stages'))
  config = tiny_config(data_dir, total_steps=6, train__stages=THREE_STAGES)
  with pytest.MonkeyPatch.context() as patch:
    built, calls = record_steps(patch)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
      result = train.train_and_evaluate(config, workdir)
  assert (result.step, result.preempted) == (6, False)
  return config, workdir, output.getvalue(), built, calls


@pytest.mark.slow
def test_three_stages_train_each_compiled_once_at_their_sizes(three_stages):
  config, workdir, out, built, calls = three_stages
  for line in ('stage 1/3 from step 1: mask 0.5, 16 px, 8 tokens',
               'stage 2/3 from step 3: mask 0.0, 16 px, 16 tokens',
               'stage 3/3 from step 5: mask 0.0, 32 px, 16 tokens'):
    assert line in out, out
  # One step per stage, each compiled for one set of shapes.
  assert [mask for mask, _ in built] == [0.5, 0.0, 0.0]
  compiled = [jitted._cache_size() for _, jitted in built]  # pylint: disable=protected-access
  assert compiled == [1, 1, 1]
  sizes = {number: (image[1], text.shape[1]) for number, image, text in calls}
  assert sizes == {1: (16, 8), 2: (16, 8), 3: (16, 16), 4: (16, 16), 5: (32, 16), 6: (32, 16)}
  eot = config.model.eot_token_id
  for number, _, text in calls:
    assert ((text == eot).sum(axis=1) == 1).all(), number   # every row ends its text once
    full = (text != 0).all(axis=1)
    assert (text[full, -1] == eot).all(), number           # a cut row ends with it
  assert calls[0][2].shape == (64, 8) and (calls[0][2] != 0).all(axis=1).any()
  losses = train.loss_history(workdir)
  assert sorted(losses) == list(range(1, 7)) and all(np.isfinite(list(losses.values())))
  # Two stream switches later, the data position is exactly six batches in.
  prepared, _ = train.prepare_config(config, workdir)
  with checkpoint.TrainCheckpointer(workdir, every_steps=10) as ckpt:
    _, _, meta = train.restore_train_state(ckpt, 6, prepared, build_model(prepared.model),
                                           make_mesh((8, 1, 1)))
  assert meta['data']['hosts']['0']['emitted'] == 6 * 64


@pytest.mark.slow
def test_resume_in_the_middle_of_stages_is_exact(three_stages, tmp_path, monkeypatch, capsys):
  """SIGTERM after step 1 (the middle of the masked stage 1) and after step 3 (the middle
  of stage 2), each time resumed by the same call: every step's loss and the final
  parameters are those of the uninterrupted run, bit for bit."""
  config, straight, *_ = three_stages
  record_steps(monkeypatch, interrupt_at=(1, 3))
  workdir = str(tmp_path / 'interrupted')
  first = train.train_and_evaluate(config, workdir)
  second = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert (first.step, first.preempted, second.step, second.preempted) == (1, True, 3, True)
  assert 'stage 1/3 from step 1 (resumed at step 2): mask 0.5, 16 px, 8 tokens' in out
  assert 'stage 2/3 from step 3: mask 0.0, 16 px, 16 tokens' in out
  last = train.train_and_evaluate(config, workdir)
  assert (last.step, last.preempted) == (6, False)
  assert 'stage 2/3 from step 3 (resumed at step 4): mask 0.0, 16 px, 16 tokens' in (
      capsys.readouterr().out)
  assert_same_run(workdir, straight)
