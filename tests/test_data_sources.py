"""Sources other than our TFRecords (img2dataset tars, TFDS), patterns, damaged shards,
the shard writer and the two command-line tools."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clip_jax import storage
from clip_jax.data import (pipeline, shards, sources, tfrecord, tokenizers, train_tokenizer,
                           write_shards)
from test_data_pipeline import IMAGE_SIZE, data_config, draw_image, encoded


@pytest.fixture(scope='module')
def bpe():
  return tokenizers.ClipBpeTokenizer(context_length=16)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_wds_shard(path: str, first: int, count: int, bad: set[int]) -> None:
  """An img2dataset-style tar: KEY.jpg|png|webp, KEY.txt, KEY.json, KEY.cls per sample."""
  with tarfile.open(path, 'w') as tar:
    for i in range(first, first + count):
      key = f'{i:09d}'
      image_format = ['JPEG', 'PNG', 'WEBP'][i % 3]
      data = b'corrupt' if i in bad else encoded(draw_image(i), image_format)
      extension = {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}[image_format]
      _add_member(tar, f'{key}.{extension}', data)
      if i % 10 != 7:                      # every 10th sample has no caption file
        _add_member(tar, f'{key}.txt', f'a drawing number {i}'.encode())
      _add_member(tar, f'{key}.json', json.dumps({'key': key}).encode())
      _add_member(tar, f'{key}.cls', str(i).encode())


@pytest.fixture(scope='module')
def wds_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('wds')
  for shard in range(4):
    write_wds_shard(str(folder / f'{shard:05d}.tar'), shard * 10, 10, bad={12, 33})
  return folder


def test_wds_tar_shards_train_and_eval(wds_dir, bpe):
  config = data_config(f'{wds_dir}/{{00000..00003}}.tar', shuffle_buffer=4)
  config.data.train.source = 'wds'
  config.data.train.label_key = 'cls'
  config.batch_size = 2
  iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  good = set(range(40)) - {12, 33} - {i for i in range(40) if i % 10 == 7}
  labels = [int(x) for _ in range(len(good) // 2) for x in next(iterator)['label']]
  assert sorted(labels) == sorted(good)
  batch = next(iterator)
  assert batch['image'].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
  np.testing.assert_array_equal(batch['text'][0], bpe([f'a drawing number {batch["label"][0]}'])[0])
  assert iterator.num_skipped >= 4
  source = sources.Source(kind='wds', pattern=f'{wds_dir}/*.tar', label_key='cls')
  evaluation = pipeline.make_eval_iterator(source, batch_size=8, image_size=IMAGE_SIZE,
                                           process_index=1, process_count=2)
  batches = list(evaluation)
  # Host 1 reads the second half of each global batch of 16: 8-15 and 24-31 (12 is corrupt).
  assert len(batches) == len(evaluation) == 3 and evaluation.num_skipped == 1
  assert 'example 12 (000000012)' in evaluation.skipped[0]
  assert sorted(np.concatenate([b['label'][b['mask']] for b in batches])) == \
      sorted((set(range(8, 16)) | set(range(24, 32))) - {12})


def test_damaged_and_missing_shards_are_logged_and_skipped(wds_dir, tmp_path, bpe):
  whole = (wds_dir / '00000.tar').read_bytes()
  (tmp_path / 'a.tar').write_bytes(whole[:len(whole) // 2])         # truncated tar
  write_wds_shard(str(tmp_path / 'b.tar'), 100, 5, bad=set())
  samples = list(sources.wds_samples(str(tmp_path / 'a.tar'), ('jpg', 'png', 'webp'), 'txt'))
  assert 0 < len(samples) < 10
  records = [dict(image=draw_image(i), caption=f'c {i}', label=i) for i in range(6)]
  shards.write_tfrecord_shards(records, str(tmp_path), 2)
  first = tmp_path / 'shard-00000-of-00002.tfrecord'
  first.write_bytes(first.read_bytes()[:-50])                     # truncated TFRecord
  pattern = f'{tmp_path}/shard-*.tfrecord,{tmp_path}/missing.tfrecord'
  config = data_config(pattern)
  config.batch_size = 1
  iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  labels = {int(next(iterator)['label'][0]) for _ in range(12)}
  assert {1, 3, 5} <= labels and labels <= set(range(6))


def test_tfrecord_framing_agrees_with_tensorflow_both_ways(tmp_path):
  payloads = [b'', b'x', os.urandom(70_000), 'caption ü'.encode()]
  ours = tmp_path / 'ours.tfrecord'
  writer = tfrecord.ShardWriter(str(ours))
  for payload in payloads:
    writer.write(payload)
  writer.close()
  assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == payloads  # checks CRCs
  theirs = tmp_path / 'theirs.tfrecord'
  with tf.io.TFRecordWriter(str(theirs)) as tf_writer:
    for payload in payloads:
      tf_writer.write(payload)
  assert theirs.read_bytes() == ours.read_bytes()
  with open(theirs, 'rb') as f:
    assert list(tfrecord.read_records(f, 'theirs')) == payloads

  # A flipped payload byte: that record is None (skipped and counted), the rest is read.
  damaged = bytearray(ours.read_bytes())
  damaged[len(tfrecord.frame(b'')) + len(tfrecord.frame(b'x')) + 12 + 100] ^= 0xFF
  assert [p is None for p in tfrecord.read_records(io.BytesIO(bytes(damaged)), 'd')] == [
      False, False, True, False]
  # A cut-off file or a corrupt length: the rest cannot be found, named with the offset.
  with pytest.raises(tfrecord.CorruptShardError,
                     match=r'cut: ends inside record 2 \(byte 33, 70000 bytes'):
    list(tfrecord.read_records(io.BytesIO(ours.read_bytes()[:1000]), 'cut'))
  bad_length = bytearray(ours.read_bytes())
  bad_length[len(tfrecord.frame(b''))] ^= 0x01
  with pytest.raises(tfrecord.CorruptShardError, match='corrupt length of record 1'):
    list(tfrecord.read_records(io.BytesIO(bytes(bad_length)), 'len'))


def test_a_failing_shard_read_is_raised_not_skipped(tmp_path, bpe):
  """A read error inside a shard (here: the file turned into a directory, so every read
  of it fails) is retried, then raised by the iterator; it never passes as bad samples."""
  records = [dict(image=draw_image(i), caption=f'c {i}', label=i) for i in range(8)]
  shards.write_tfrecord_shards(records, str(tmp_path), 2)
  config = data_config(f'{tmp_path}/shard-*.tfrecord')
  config.batch_size, config.data.read_attempts, config.data.read_retry_seconds = 2, 2, 0.0
  config.data.shuffle_buffer = 1
  iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  second = tmp_path / 'shard-00001-of-00002.tfrecord'
  second.unlink()
  second.mkdir()      # every open of it fails (IsADirectoryError), as if a disk had gone
  with pytest.raises(storage.StorageError, match=rf'{second}: .* failed 2 time\(s\)'):
    for _ in range(8):
      next(iterator)
  iterator.close()


def test_tfds_source_by_name_without_download(tmp_path, bpe):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TinyDrawings(tfds.core.GeneratorBasedBuilder):
    """Three classes of drawn pictures."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=['red thing', 'green thing', 'blue thing'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(9), 'test': self._generate_examples(7)}

    def _generate_examples(self, count):
      for i in range(count):
        yield i, {'image': draw_image(i), 'label': i % 3}

  TinyDrawings(data_dir=str(tmp_path)).download_and_prepare()
  config = data_config('')
  config.data.train.update(source='tfds', tfds_name='tiny_drawings', data_dir=str(tmp_path),
                           caption_template='a photo of a {}.')
  config.batch_size = 3
  iterator = pipeline.make_train_iterator(config, bpe, process_index=0, process_count=1)
  batches = [next(iterator) for _ in range(6)]        # two epochs of 9
  labels = np.concatenate([b['label'] for b in batches])
  assert sorted(labels[:9]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  names = ['red thing', 'green thing', 'blue thing']
  for batch in batches[:2]:
    for label, text in zip(batch['label'], batch['text']):
      np.testing.assert_array_equal(text, bpe([f'a photo of a {names[label]}.'])[0])
  source = sources.Source(kind='tfds', tfds_name='tiny_drawings', tfds_split='test',
                          data_dir=str(tmp_path), label_key='label')
  hosts = [pipeline.make_eval_iterator(source, batch_size=2, image_size=IMAGE_SIZE,
                                       process_index=h, process_count=2) for h in (0, 1)]
  assert [len(h) for h in hosts] == [2, 2] and [h.host_count for h in hosts] == [4, 3]
  counted = [int(sum(b['mask'].sum() for b in h)) for h in hosts]
  assert counted == [4, 3]
  missing = sources.Source(kind='tfds', tfds_name='tiny_drawings', data_dir=str(tmp_path / 'x'))
  with pytest.raises(ValueError, match='nothing is downloaded'):
    pipeline.make_eval_iterator(missing, batch_size=2, image_size=8, process_index=0,
                                process_count=1)


def test_patterns_ranges_commas_globs(tmp_path):
  for name in ('a-00.tar', 'a-01.tar', 'a-02.tar', 'b.tfrecord'):
    (tmp_path / name).write_bytes(b'')
  assert sources.expand_pattern(f'{tmp_path}/a-{{00..02}}.tar') == \
      [f'{tmp_path}/a-0{i}.tar' for i in range(3)]
  assert sources.expand_pattern(f'{tmp_path}/a-{{01..02}}.tar, {tmp_path}/*.tfrecord') == \
      [f'{tmp_path}/a-01.tar', f'{tmp_path}/a-02.tar', f'{tmp_path}/b.tfrecord']
  assert sources.expand_pattern([f'{tmp_path}/a-*.tar']) == sources.expand_pattern(
      f'{tmp_path}/a-0[0-2].tar')
  assert sources.host_files(list('abcde'), 1, 2) == ['b', 'd']
  with pytest.raises(ValueError, match='config.data.train.source'):
    sources.Source(kind='csv', pattern='x', name='config.data.train')
  with pytest.raises(ValueError, match='pattern: empty'):
    sources.Source(kind='wds')
  with pytest.raises(ValueError, match='caption_template'):
    sources.Source(kind='tfds', tfds_name='x', caption_template='no placeholder')


def test_write_tfrecord_shards_round_trip(tmp_path):
  png = encoded(draw_image(1), 'PNG')
  records = [dict(image=draw_image(0, (60, 30)), caption='one', label=7, key='k0'),
             dict(image=png, caption=['two', 'deux']),
             dict(image=draw_image(2, (300, 200)), caption='three')]
  paths = shards.write_tfrecord_shards(records, str(tmp_path / 'plain'), num_shards=2)
  assert [os.path.basename(p) for p in paths] == ['shard-00000-of-00002.tfrecord',
                                                  'shard-00001-of-00002.tfrecord']
  examples = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(paths)]
  features = [e.features.feature for e in examples]           # round-robin: 0, 2 | 1
  assert [list(f['caption'].bytes_list.value) for f in features] == [[b'one'], [b'three'],
                                                                     [b'two', b'deux']]
  assert features[0]['label'].int64_list.value == [7] and 'label' not in features[2]
  assert features[0]['key'].bytes_list.value == [b'k0']
  assert features[2]['image'].bytes_list.value[0] == png                # bytes kept as given
  decoded = np.asarray(Image.open(io.BytesIO(features[0]['image'].bytes_list.value[0])))
  assert decoded.shape == (30, 60, 3) and np.abs(decoded.astype(int) - draw_image(0, (60, 30))).mean() < 6
  resized = shards.write_tfrecord_shards(records, str(tmp_path / 'small'), 1, image_size=50)
  sizes = [Image.open(io.BytesIO(tf.train.Example.FromString(r.numpy()).features.feature[
      'image'].bytes_list.value[0])).size for r in tf.data.TFRecordDataset(resized)]
  assert sizes == [(60, 30), (64, 48), (75, 50)]      # shorter side <= 50, never upscaled
  with pytest.raises(ValueError, match='record 1: missing "caption"'):
    shards.write_tfrecord_shards([records[0], dict(image=png)], str(tmp_path / 'x'), 1)
  with pytest.raises(ValueError, match='record 0: image'):
    shards.write_tfrecord_shards([dict(image=np.zeros((4, 4), np.float32), caption='c')],
                                 str(tmp_path / 'y'), 1)


def test_write_shards_cli_reports_bad_inputs(tmp_path, capsys, bpe):
  images = tmp_path / 'images'
  images.mkdir()
  for i in range(5):
    Image.fromarray(draw_image(i)).save(images / f'{i}.jpg')
  (images / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  rows = [('images/0.jpg', 'zero'), ('images/1.jpg', 'one, with a comma'), ('images/2.jpg', ''),
          ('images/missing.jpg', 'gone'), ('images/broken.jpg', 'broken'),
          (str(images / '3.jpg'), 'three'), ('images/4.jpg', 'four')]
  with open(tmp_path / 'pairs.csv', 'w', newline='', encoding='utf-8') as f:
    import csv  # pylint: disable=import-outside-toplevel
    writer = csv.writer(f)
    writer.writerow(['filepath', 'title'])
    writer.writerows(rows)
  assert write_shards.main(['--input', str(tmp_path / 'pairs.csv'), '--output',
                            str(tmp_path / 'out'), '--num_shards', '2', '--image_size', '40']) == 0
  out = capsys.readouterr().out
  assert 'wrote 4 records to 2 shards' in out and 'skipped 3 bad input(s)' in out
  assert 'images/2.jpg: empty caption' in out and 'images/missing.jpg: missing file' in out
  assert 'images/broken.jpg: undecodable image' in out
  source = sources.Source(kind='tfrecord', pattern=str(tmp_path / 'out' / '*.tfrecord'))
  batches = list(pipeline.make_eval_iterator(source, batch_size=4, image_size=IMAGE_SIZE,
                                             tokenizer=bpe, process_index=0, process_count=1))
  texts = {tuple(row) for row in batches[0]['text']}
  assert texts == {tuple(r) for r in bpe(['zero', 'one, with a comma', 'three', 'four'])}
  # JSON lines with caption lists and labels; a wrong column name is a clear error.
  with open(tmp_path / 'pairs.jsonl', 'w', encoding='utf-8') as f:
    for i in range(3):
      f.write(json.dumps({'image': f'images/{i}.jpg', 'texts': [f'c{i}', f'd{i}'], 'y': i}) + '\n')
  assert write_shards.main(['--input', str(tmp_path / 'pairs.jsonl'), '--output',
                            str(tmp_path / 'out2'), '--num_shards', '1', '--image_column', 'image',
                            '--caption_column', 'texts', '--label_column', 'y']) == 0
  assert 'wrote 3 records to 1 shards' in capsys.readouterr().out
  assert write_shards.main(['--input', str(tmp_path / 'pairs.csv'), '--output',
                            str(tmp_path / 'out3'), '--num_shards', '1',
                            '--caption_column', 'caption']) == 2
  assert "no column 'caption'" in capsys.readouterr().err


def test_train_tokenizer_cli_from_shards_and_text(tmp_path, capsys):
  records = [dict(image=b'x', caption=f'a {c} {s} on the left') for c in ('red', 'blue', 'green')
             for s in ('circle', 'square', 'star', 'ring')]
  shards.write_tfrecord_shards(records * 5, str(tmp_path), 3)
  prefix = str(tmp_path / 'tok' / 'captions')
  assert train_tokenizer.main(['--input', f'{tmp_path}/*.tfrecord', '--output_prefix', prefix,
                               '--vocab_size', '64']) == 0
  out = capsys.readouterr().out
  assert 'on 60 captions' in out and f'wrote {prefix}.model' in out
  tok = tokenizers.SentencePieceTokenizer(prefix + '.model', context_length=40)
  assert tok.decode(tok(['A red star on the left'])[0]) == 'a red star on the left'
  (tmp_path / 'captions.txt').write_text('\n'.join(r['caption'] for r in records))
  assert train_tokenizer.main(['--input', str(tmp_path / 'captions.txt'), '--output_prefix',
                               prefix + '2', '--vocab_size', '40']) == 0
  assert '(text)' in capsys.readouterr().out
