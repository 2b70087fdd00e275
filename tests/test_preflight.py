"""Setup refuses what would fail later, the user's flags win over the config file, data
kinds and img2dataset's feature names are found without flags, skips are named."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from clip_jax import config as config_lib
from clip_jax import preflight, sharding, train
from clip_jax.data import pipeline, shards, sources, tokenizers
from clip_jax.metrics_writer import DATA_SKIPPED, console_line
from test_data_pipeline import data_config, draw_image, encoded
from test_data_sources import write_wds_shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes(*values: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(*values: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def write_img2dataset_tfrecord(path: str, first: int, count: int, bad: set[int]) -> None:
  """Records as img2dataset's `--output_format=tfrecord` writes them (its feature names)."""
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(first, first + count):
      key = f'{i:09d}'.encode()
      image = b'not a jpeg' if i in bad else encoded(draw_image(i), 'JPEG')
      features = dict(key=_bytes(key), jpg=_bytes(image), txt=_bytes(f'caption {i}'.encode()),
                      caption=_bytes(f'caption {i}'.encode()), url=_bytes(b'http://x/' + key),
                      width=_ints(64), height=_ints(48), original_width=_ints(640),
                      original_height=_ints(480), status=_bytes(b'success'),
                      error_message=_bytes(b''), sha256=_bytes(b'0' * 64))
      writer.write(tf.train.Example(features=tf.train.Features(feature=features))
                   .SerializeToString())


@pytest.fixture(scope='module')
def bpe():
  return tokenizers.ClipBpeTokenizer(context_length=16)


def test_the_source_kind_follows_the_pattern_unless_given():
  def kind(**section):
    return sources.Source.from_config(dict(dict(source='', pattern=''), **section))

  assert kind(pattern='gs://b/{00000..00009}.tar').kind == 'wds'
  assert kind(pattern='a/*.tar,b/*.TAR').kind == 'wds'
  assert kind(pattern='a/*.tfrecord').kind == 'tfrecord'
  assert kind(pattern='a/*.tar,b/*.tfrecord').kind == 'tfrecord'
  tfds = kind(pattern='tfds:cifar10')
  assert (tfds.kind, tfds.tfds_name, tfds.pattern) == ('tfds', 'cifar10', '')
  assert kind(tfds_name='cifar10').kind == 'tfds'
  assert kind(source='tfrecord', pattern='weird/*.tar').kind == 'tfrecord'   # given wins
  with pytest.raises(ValueError, match='config.data.train.pattern: .*tfds_name'):
    kind(source='tfds', pattern='a/*.tfrecord')


def test_img2dataset_tfrecords_train_with_the_default_keys_and_skips_are_named(
    tmp_path, bpe, caplog):
  for shard in range(2):
    write_img2dataset_tfrecord(str(tmp_path / f'{shard:05d}.tfrecord'), 10 * shard, 10,
                               bad={3, 14})
  config = data_config(str(tmp_path / '{00000..00001}.tfrecord'), shuffle_buffer=1)
  config.data.train.label_key = ''
  with caplog.at_level(logging.WARNING, logger='clip_jax.data.sources'):
    iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(4)]
    iterator.close()
  assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  assert iterator.num_skipped == 2
  skipped = [r.getMessage() for r in caplog.records if 'skipped a sample' in r.getMessage()]
  # (the stream reads ahead into the next epoch, where they are skipped again)
  assert set(skipped) == set(
      f'skipped a sample (undecodable image or record): {tmp_path / f"{i // 10:05d}.tfrecord"}, '
      f'record {i % 10}, key {i:09d}' for i in (3, 14))


def test_a_sample_without_caption_is_logged_with_its_tar_and_key(tmp_path, bpe, caplog):
  write_wds_shard(str(tmp_path / '00000.tar'), 0, 10, bad=set())   # sample 7: no caption
  config = data_config(str(tmp_path / '*.tar'), shuffle_buffer=1)
  config.data.train.label_key = ''
  with caplog.at_level(logging.WARNING, logger='clip_jax.data.sources'):
    iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
    next(iterator), next(iterator)
    iterator.close()
  assert (f'skipped a sample (no caption): {tmp_path / "00000.tar"}, record 7, key 000000007'
          in [r.getMessage() for r in caplog.records])


def test_no_readable_sample_lists_the_features_of_the_first_record(tmp_path, bpe):
  with tf.io.TFRecordWriter(str(tmp_path / "odd.tfrecord")) as writer:
    example = tf.train.Example(features=tf.train.Features(feature=dict(
        picture=_bytes(encoded(draw_image(0))), text=_bytes(b'a caption'), idx=_ints(0))))
    writer.write(example.SerializeToString())
  config = data_config(str(tmp_path / '*.tfrecord'))
  config.data.train.label_key = ''
  with pytest.raises(ValueError) as error:
    preflight.check_train_data(config)
  message = str(error.value)
  assert 'the first record of' in message and 'odd.tfrecord' in message
  assert 'idx (int64), picture (bytes), text (bytes)' in message
  assert 'config.data.train.image_key / caption_key' in message
  config.data.train.image_key, config.data.train.caption_key = 'picture', 'text'
  preflight.check_train_data(config)        # the keys it named make it readable


def test_mesh_that_does_not_fit_the_devices_is_named():
  config = config_lib.get_config('tiny')
  config.mesh.shape = (3, -1, 1)
  with pytest.raises(ValueError, match=r'config.mesh.shape: \(3, -1, 1\) .* the 8 device'):
    preflight.check_mesh(config)
  config.mesh.shape = (2, 2, 1)
  with pytest.raises(ValueError, match='must multiply to 8'):
    preflight.check_mesh(config)
  config.mesh.shape = (2, -1, 2)
  preflight.check_mesh(config)


def test_batches_that_do_not_split_over_the_mesh_are_named():
  config = config_lib.get_config('tiny')
  mesh = sharding.make_mesh((4, 2, 1), ('data', 'fsdp', 'model'))
  config.batch_size, config.eval.batch_size = 64, 100
  with pytest.raises(ValueError, match=r'config.eval.batch_size: 100 .* 8 devices .* e.g. 104'):
    preflight.check_batch_sizes(config, mesh)
  config.eval.batch_size, config.batch_size = 104, 36
  with pytest.raises(ValueError, match='config.batch_size: 36'):
    preflight.check_batch_sizes(config, mesh)
  config.batch_size = 64
  preflight.check_batch_sizes(config, mesh)
  tensor_parallel = sharding.make_mesh((2, 1, 4), ('data', 'fsdp', 'model'))
  config.eval.batch_size = 2                 # the model axis does not carry the batch
  preflight.check_batch_sizes(config, tensor_parallel)


def test_intervals_that_can_never_fire_are_named():
  config = config_lib.get_config('tiny')
  config.total_steps, config.checkpoint.every_steps = 1000, 100
  config.checkpoint.keep_every = 150
  with pytest.raises(ValueError, match='config.checkpoint.keep_every: 150 .*every_steps=100'):
    preflight.check_intervals(config)
  config.checkpoint.keep_every = 2000
  with pytest.raises(ValueError, match='config.checkpoint.keep_every: 2000 is beyond'):
    preflight.check_intervals(config)
  config.checkpoint.keep_every, config.eval.every_steps = 0, 5000
  with pytest.raises(ValueError, match='config.eval.every_steps: 5000 is beyond'):
    preflight.check_intervals(config)
  config.eval.every_steps, config.total_steps = 0, 30
  assert preflight.check_intervals(config) == [
      'checkpoints: config.checkpoint.every_steps=100 >= config.total_steps=30: only the '
      'last step is saved']


def test_a_workdir_that_cannot_be_written_is_named(tmp_path):
  preflight.check_workdir_writable(str(tmp_path / 'fresh' / 'run'))
  assert os.listdir(tmp_path / 'fresh' / 'run') == []       # the probe is gone
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(OSError, match=r'--workdir .*a_file/run: not writable'):
    preflight.check_workdir_writable(str(tmp_path / 'a_file' / 'run'))


def test_missing_or_unreadable_eval_sets_are_named(tmp_path, bpe):
  config = config_lib.get_config('tiny')
  mesh = sharding.make_mesh((-1, 1, 1), ('data', 'fsdp', 'model'))
  config.eval.batch_size = 8
  config.eval.zeroshot = f'builtin,folder:{tmp_path}/nowhere'
  with pytest.raises(ValueError, match=r"config.eval.zeroshot: dataset 'folder:.*nowhere'"):
    preflight.check_eval_data(config, mesh, bpe)
  broken = tmp_path / 'broken' / 'cat'
  broken.mkdir(parents=True)
  for i in range(3):
    (broken / f'{i}.jpg').write_bytes(b'not an image')
  config.eval.zeroshot = ''
  config.eval.linear_probe = f'folder:{tmp_path}/broken'
  with pytest.raises(ValueError, match=r"config.eval.linear_probe: .* none of the first 8"):
    preflight.check_eval_data(config, mesh, bpe)
  records = [dict(image=b'garbage', caption='x', label=0)]
  shards.write_tfrecord_shards(records, str(tmp_path / 'shards'), 1)
  config.eval.linear_probe = ''
  config.eval.zeroshot = f'shards:{tmp_path}/shards/*.tfrecord'
  with pytest.raises(ValueError, match=r"config.eval.zeroshot: .* no readable sample"):
    preflight.check_eval_data(config, mesh, bpe)
  config.eval.zeroshot = 'builtin'
  preflight.check_eval_data(config, mesh, bpe)


def test_a_tokenizer_that_does_not_fit_the_model_is_named(bpe):
  config = config_lib.get_config('tiny')
  config.data.tokenizer.context_length = config.model.text.context_length = 16
  with pytest.raises(ValueError, match=r'config.data.tokenizer: 49408 token ids do not fit '
                                       r'config.model.text.vocab_size=512'):
    train.check_tokenizer(config, bpe)


def test_the_users_data_turns_the_builtin_scenes_and_their_evaluation_off():
  def tiny(**train_section):
    config = config_lib.get_config('tiny')
    config.builtin.enabled, config.eval.zeroshot = True, 'builtin,builtin_seen'
    config.eval.retrieval = 'builtin_captions'
    config.data.train.update(train_section)
    return config

  config = tiny()
  assert train.choose_data(config) == [] and config.builtin.enabled   # the default run
  config = tiny(pattern='shards/*.tar')
  notes = train.choose_data(config, frozenset({'data.train.pattern'}))
  assert not config.builtin.enabled and config.eval.zeroshot == config.eval.retrieval == ''
  assert notes[0] == 'data: config.data.train names your data, so the built-in scenes are off'
  assert 'builtin, builtin_seen' in notes[1] and '--config.eval.zeroshot=' in notes[1]
  config = tiny(pattern='shards/*.tar')     # an explicit eval key is kept as given
  train.choose_data(config, frozenset({'data.train.pattern', 'eval.zeroshot'}))
  assert config.eval.zeroshot == 'builtin,builtin_seen' and config.eval.retrieval == ''
  with pytest.raises(ValueError, match='config.builtin.enabled=True and config.data.train'):
    train.choose_data(tiny(pattern='x/*.tar'), frozenset({'builtin.enabled'}))
  with pytest.raises(ValueError, match="config.data.train.source='wds' given without"):
    train.choose_data(tiny(source='wds'), frozenset({'data.train.source'}))


def test_the_console_line_shows_the_skipped_count():
  line = console_line(10, 100, {'loss': 1.0, DATA_SKIPPED: 3.0}, elapsed=5,
                      steps_per_second=2.0)
  assert '| skipped 3 |' in line and DATA_SKIPPED == 'data/skipped'


@pytest.mark.slow
def test_tiny_on_your_own_img2dataset_shards_from_a_fresh_folder(tmp_path):
  """The README's own-data line: tiny trains on the user's tars, with a tokenizer trained
  on their captions, no built-in evaluation, `data/skipped` counted; --dry_run first."""
  (tmp_path / 'shards').mkdir()
  for shard in range(2):
    write_wds_shard(str(tmp_path / 'shards' / f'{shard:05d}.tar'), 40 * shard, 40, bad={5})
  command = [sys.executable, '-m', 'clip_jax.main', '--config=configs/tiny.py',
             "--config.data.train.pattern=shards/{00000..00001}.tar",
             '--config.total_steps=3', '--config.batch_size=16', '--config.log.every_steps=1']
  env = dict(os.environ, PYTHONPATH=REPO)
  dry = subprocess.run(command + ['--dry_run'], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
  assert 'Every check passed; nothing was trained.' in dry.stdout
  assert not (tmp_path / 'workdir' / 'checkpoints').exists()
  run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  out = run.stdout
  assert 'the built-in scenes are off' in out
  assert 'tokenizer: SentencePiece (at most 512 ids) trained on the captions' in dry.stdout
  assert (tmp_path / 'workdir' / 'tokenizer' / 'captions.model').exists()
  assert not (tmp_path / 'workdir' / 'builtin_data').exists()
  assert 'zero-shot' not in out and '| skipped ' in out
  last = json.loads((tmp_path / 'workdir' / 'metrics.jsonl').read_text().splitlines()[-1])
  assert last[DATA_SKIPPED] >= 1
  assert 'skipped a sample (undecodable image or record)' in run.stderr
  for noise in ('oneDNN', 'libtpu', 'cpu_feature_guard'):
    assert noise not in run.stdout + run.stderr, noise
  assert np.isfinite(last['loss'])
