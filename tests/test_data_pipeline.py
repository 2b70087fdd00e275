"""The tf.data train and eval streams over TFRecord shards of real (PIL-drawn) images:
shapes and values, two hosts, planted corrupt samples, exact resume, eval padding."""

import importlib
import io
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw

from clip_jax import config as config_lib
from clip_jax.data import delivery, eval_input, pipeline, preprocess, shards, sources, tokenizers

NUM_RECORDS = 48
CORRUPT = {3, 14, 25, 36}          # undecodable image bytes (random, or a truncated JPEG)
EMPTY_CAPTION = {5, 31}            # caption '' or whitespace only
BAD = CORRUPT | EMPTY_CAPTION
IMAGE_SIZE = 32


def draw_image(index: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
  """A real picture: a tinted background with a coloured ellipse and a box, uint8 [H, W, 3]."""
  rng = np.random.default_rng(index)
  width, height = size
  image = Image.new('RGB', size, tuple(int(c) for c in rng.integers(0, 255, 3)))
  draw = ImageDraw.Draw(image)
  x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
  draw.ellipse([x, y, x + width // 2, y + height // 2], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
  draw.rectangle([width // 3, height // 3, width // 2, height // 2], outline=(255, 255, 255), width=2)
  return np.asarray(image)


def encoded(array: np.ndarray, image_format: str = 'JPEG') -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format)
  return buffer.getvalue()


def make_records(count: int = NUM_RECORDS) -> list[dict]:
  """Records with unique labels (= index), several formats and sizes, planted bad ones."""
  records = []
  for i in range(count):
    size = [(64, 48), (48, 64), (40, 40), (80, 36)][i % 4]
    array = draw_image(i, size)
    image = array if i % 5 else encoded(array, ['PNG', 'BMP', 'GIF'][i % 3])
    if i in CORRUPT:
      image = encoded(array)[:60] if i % 2 else b'\x00not an image at all'
    caption = '  ' if i == 31 else ('' if i in EMPTY_CAPTION else f'a drawing of shape {i}')
    captions = [caption, f'picture number {i}'] if i % 4 == 1 and i not in BAD else caption
    records.append(dict(image=image, caption=captions, label=i, key=f'img{i}'))
  return records


@pytest.fixture(scope='module')
def shard_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tfrecords')
  shards.write_tfrecord_shards(make_records(), str(folder), num_shards=6)
  return folder


@pytest.fixture(scope='module')
def bpe():
  return tokenizers.ClipBpeTokenizer(context_length=16)


def data_config(pattern: str, **data_overrides) -> ml_collections.ConfigDict:
  config = config_lib.get_config('tiny')
  config.model.vision.image_size = IMAGE_SIZE
  config.data.train.pattern = pattern
  config.data.train.label_key = 'label'
  config.data.shuffle_buffer = 8
  config.data.cycle_length = 2
  config.batch_size = 4
  config.data.update(data_overrides)
  return config


def labels_of(iterator, num_batches: int) -> list[int]:
  return [int(x) for _ in range(num_batches) for x in next(iterator)['label']]


def test_train_batches_shapes_values_and_tokens(shard_dir, bpe):
  iterator = pipeline.make_train_iterator(data_config(f'{shard_dir}/*.tfrecord'), bpe,
                                          process_index=0, process_count=1)
  batch = next(iterator)
  assert set(batch) == {'image', 'text', 'label'}
  assert batch['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and batch['image'].dtype == np.float32
  low = (0 - np.array(preprocess.CLIP_MEAN)) / np.array(preprocess.CLIP_STD)
  high = (1 - np.array(preprocess.CLIP_MEAN)) / np.array(preprocess.CLIP_STD)
  assert (batch['image'] >= low - 1e-5).all() and (batch['image'] <= high + 1e-5).all()
  assert batch['image'].std() > 0.1
  assert batch['text'].shape == (4, 16) and batch['text'].dtype == np.int32
  assert batch['label'].dtype == np.int32 and not set(batch['label']) & BAD
  for label, row in zip(batch['label'], batch['text']):
    choices = bpe([f'a drawing of shape {label}', f'picture number {label}'])
    assert (row == choices[0]).all() or (label % 4 == 1 and (row == choices[1]).all())


def test_two_hosts_read_disjoint_files_covering_everything(shard_dir, bpe):
  good = set(range(NUM_RECORDS)) - BAD
  seen = []
  for host in (0, 1):
    config = data_config(f'{shard_dir}/*.tfrecord')
    config.batch_size = 2       # per host: 1, so one epoch is exactly the good samples
    iterator = pipeline.make_train_iterator(config, bpe, process_index=host, process_count=2)
    files = sources.host_files(sources.expand_pattern(f'{shard_dir}/*.tfrecord'), host, 2)
    shard_numbers = [int(os.path.basename(f).split('-')[1]) for f in files]
    host_good = {i for i in good if i % 6 in shard_numbers}
    labels = labels_of(iterator, len(host_good))
    assert set(labels) == host_good and len(labels) == len(host_good)
    seen.append(host_good)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == good


def test_corrupt_and_empty_samples_are_skipped_and_counted(shard_dir, bpe):
  config = data_config(f'{shard_dir}/*.tfrecord')
  config.batch_size = 6
  iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  good = NUM_RECORDS - len(BAD)
  labels = labels_of(iterator, 2 * good // 6)       # two epochs
  assert not set(labels) & BAD and sorted(labels) == sorted(2 * list(set(range(NUM_RECORDS)) - BAD))
  # Every bad record of epoch 0 was read before the last sample of epoch 1.
  assert len(BAD) <= iterator.num_skipped <= 2 * len(BAD)
  state = iterator.state_dict()
  assert iterator.num_skipped == state['raw_seen'] - state['emitted']
  assert state['emitted'] == 2 * good


def test_same_seed_same_stream_and_exact_resume(shard_dir, bpe):
  config = data_config(f'{shard_dir}/*.tfrecord')
  reference = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  batches = [next(reference) for _ in range(13)]      # 52 samples: past the first epoch (42)
  again = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  for expected in batches[:3]:
    got = next(again)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['text'], expected['text'])
  other_seed = data_config(f'{shard_dir}/*.tfrecord')
  other_seed.seed = 1
  assert labels_of(pipeline.make_train_iterator(other_seed, bpe, process_index=0,
                                                process_count=1), 3) != labels_of(iter(batches), 3)
  # Resume from positions inside a group, at group ends and across the epoch boundary.
  for stop in (3, 10):
    stopped = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
    for _ in range(stop):
      next(stopped)
    state = stopped.state_dict()
    restored = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1,
                                            state=state)
    for expected in batches[stop:]:
      got = next(restored)
      for key in ('image', 'text', 'label'):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f'resume at {stop}: {key}')
    assert restored.num_skipped == reference.num_skipped
  # restore() on a used iterator rewinds it too; a state from other data is refused.
  reference.restore(state)
  np.testing.assert_array_equal(next(reference)['label'], batches[10]['label'])
  # The all-hosts form (delivery.all_host_states) restores each host from its own entry.
  host_states = delivery.all_host_states(state)
  assert host_states == {'hosts': {'0': state}} and json.loads(json.dumps(host_states)) == host_states
  reference.restore(host_states)
  np.testing.assert_array_equal(next(reference)['label'], batches[10]['label'])
  second_host = pipeline.make_train_iterator(config, bpe, process_index=1, process_count=2)
  with pytest.raises(ValueError, match='no entry for host 1'):
    second_host.restore(host_states)
  with pytest.raises(ValueError, match='fingerprint'):
    second_host.restore(state)           # host 0's position is not host 1's
  config.data.cycle_length = 3
  with pytest.raises(ValueError, match='fingerprint'):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1, state=state)


def test_a_data_state_of_another_version_is_refused(shard_dir, bpe):
  config = data_config(f'{shard_dir}/*.tfrecord')
  iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  newer = dict(iterator.state_dict(), version=pipeline.STATE_VERSION + 1)
  expected = (rf'data iterator state \(the data position saved with the checkpoint\): format '
              rf'version {pipeline.STATE_VERSION + 1}, but this clip_jax reads version '
              rf'{pipeline.STATE_VERSION}')
  with pytest.raises(ValueError, match=expected):
    iterator.restore(newer)
  with pytest.raises(ValueError, match=expected):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1,
                                 state=delivery.all_host_states(newer))
  iterator.restore(dict(newer, version=pipeline.STATE_VERSION))    # its own version is read
  iterator.close()


def test_tensorflow_leaves_the_gpus_when_a_stream_is_built_not_at_import(monkeypatch):
  """Importing the pipeline changes nothing; the first stream hides the GPUs, once."""
  calls = []
  monkeypatch.setattr(tf.config, 'set_visible_devices', lambda *args: calls.append(args))
  importlib.reload(pipeline)
  assert not calls
  sources.tensorflow_on_cpu.cache_clear()
  sources.StreamControl().finish()
  sources.StreamControl().finish()
  assert calls == [([], 'GPU')]


def test_random_resized_crop_option_and_square_crop_geometry(shard_dir, bpe):
  config = data_config(f'{shard_dir}/*.tfrecord', crop='random_resized', crop_scale=(0.3, 1.0))
  batch = next(pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1))
  assert batch['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  # A full-scale square crop of a square image is the whole image, resized.
  image = draw_image(7, (40, 40))
  crop = preprocess.decode_random_crop(encoded(image, 'PNG'), np.array([1, 2]), 20,
                                       scale=(1.0, 1.0), method='area')
  expected = image.reshape(20, 2, 20, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(crop.numpy(), expected, atol=1e-3)
  config.data.crop = 'center'
  with pytest.raises(ValueError, match='config.data.crop'):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)


def test_center_crop_matches_torchvision_arithmetic():
  image = draw_image(3, (80, 36))
  ours = eval_input.decode_image(encoded(image, 'PNG'), 24)
  # torchvision Resize(24) + CenterCrop(24): 80x36 -> 53x24, left offset round(29 / 2) = 14.
  reference = np.asarray(Image.fromarray(image).resize((53, 24), Image.BICUBIC), np.float32)
  np.testing.assert_allclose(ours, eval_input.normalize_pixels(reference[:, 14:38]), atol=1e-6)


def test_eval_stream_same_batches_on_every_host_with_mask(shard_dir, bpe):
  source = sources.Source(kind='tfrecord', pattern=f'{shard_dir}/*.tfrecord', label_key='label')
  file_order = [i for shard in range(6) for i in range(shard, NUM_RECORDS, 6)]
  seen, lengths, host_batches = [], set(), []
  for host in (0, 1):
    iterator = pipeline.make_eval_iterator(source, batch_size=5, image_size=IMAGE_SIZE,
                                           tokenizer=bpe, process_index=host, process_count=2)
    batches = list(iterator)
    lengths.add((len(iterator), len(batches)))
    batch = batches[0]
    assert set(batch) == {'image', 'text', 'label', 'mask', 'index'}
    assert batch['mask'].dtype == bool
    assert batch['image'].shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3)
    mask = np.concatenate([b['mask'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])[mask]
    assert (np.concatenate([b['label'] for b in batches])[~mask] == -1).all()
    # The one eval split (clip_jax.data.eval_input): the host's half of each global batch
    # of 10, in file order.
    host_records = [file_order[i] for i in range(NUM_RECORDS) if (i % 10) // 5 == host]
    assert iterator.host_count == len(host_records) == [25, 23][host]
    np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches])[mask],
                                  [i for i in range(NUM_RECORDS) if (i % 10) // 5 == host
                                   and file_order[i] not in CORRUPT])
    assert iterator.num_skipped == len(CORRUPT & set(host_records))
    np.testing.assert_array_equal(labels, [i for i in host_records if i not in CORRUPT])
    seen.append(set(labels))
    host_batches.append(batches)
  assert lengths == {(5, 5)}        # ceil(24 / 5) on both hosts
  assert seen[0] | seen[1] == set(range(NUM_RECORDS)) - CORRUPT
  # Deterministic: a second pass gives the same pixels.
  again = pipeline.make_eval_iterator(source, batch_size=5, image_size=IMAGE_SIZE,
                                      process_index=0, process_count=2, max_examples=NUM_RECORDS)
  first = next(iter(again))
  assert 'text' not in first and len(again) == 5
  np.testing.assert_array_equal(first['image'], host_batches[0][0]['image'])


def test_no_readable_sample_fails_naming_the_source(tmp_path, bpe):
  bad = [dict(image=b'garbage', caption='a caption'), dict(image=draw_image(0), caption='')]
  shards.write_tfrecord_shards(bad, str(tmp_path), num_shards=1)
  config = data_config(f'{tmp_path}/*.tfrecord')
  config.data.train.label_key = ''
  with pytest.raises(ValueError, match=r'config.data.train: no readable sample .* 1 file\(s\) of host 0'):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  config.data.train.pattern = f'{tmp_path}/nothing-*.tfrecord'
  with pytest.raises(ValueError, match='config.data.train.pattern: no file matches'):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  config.data.train.pattern = f'{tmp_path}/*.tfrecord'
  with pytest.raises(ValueError, match='cannot be split over 2 hosts'):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=2)
  config.batch_size = 5
  with pytest.raises(ValueError, match='config.batch_size'):
    pipeline.make_train_iterator(config, bpe, process_index=0, process_count=2)
