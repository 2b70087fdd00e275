"""One evaluation input path: the same pictures stored as an image folder, a TFDS dataset,
TFRecord shards and wds tars give the same pixels (open_clip's eval transform, with a real
resize: every picture is larger than the model's 32 px and not square), the same features
and the same scores; two hosts read every example exactly once; counts are read once."""

import io
import json
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax.api import ClipModel
from clip_jax.config import get_config
from clip_jax.data import eval_input, pipeline, shards, sources, tfrecord
from clip_jax.evaluate import datasets as ds
from clip_jax.evaluate.run import image_features, run_evaluations
from clip_jax.models import model_config
from clip_jax.sharding import make_mesh
from test_eval_data import _hash_tokenizer
from test_eval_features import random_variables

IMAGE_SIZE = 32
CLASSES = ('blue', 'green', 'red')
PER_CLASS = 7        # 21 examples: two global batches of 16, the second one short
SIZES = ((50, 37), (41, 64), (64, 33), (37, 90), (45, 52), (80, 56), (33, 47))   # (w, h)
GLOBAL_BATCH = 16


def picture(label: int, i: int) -> np.ndarray:
  """A smooth, non-square uint8 picture: a class-coloured gradient with a soft blob."""
  width, height = SIZES[i % len(SIZES)]
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  colour = np.eye(3, dtype=np.float32)[[2, 1, 0][label]] * 200 + 30
  cx, cy = width * (0.3 + 0.05 * i), height * (0.6 - 0.04 * i)
  blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.1 * width * height))
  ramp = 0.4 + 0.6 * (x / width + y / height) / 2
  pixels = colour * ramp[..., None] + 60 * blob[..., None] * np.array([1.0, 0.8, 0.6])
  return np.clip(pixels, 0, 255).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def stored(tmp_path_factory):
  """The same 21 pictures as a folder, a TFDS dataset, TFRecord shards and tars, in one
  order (the folder's: class, then file name); returns the dataset specs and data_dir."""
  import tensorflow_datasets as tfds
  root = tmp_path_factory.mktemp('eval_input')
  examples = [dict(label=label, name=f'{name}/{i:02d}.png', image=picture(label, i),
                   caption=f'a {name} picture number {i}')
              for label, name in enumerate(CLASSES) for i in range(PER_CLASS)]
  for example in examples:
    (root / 'pics' / example['name']).parent.mkdir(parents=True, exist_ok=True)
    (root / 'pics' / example['name']).write_bytes(png(example['image']))
  (root / 'pics' / 'captions.jsonl').write_text(''.join(
      json.dumps({'image': e['name'], 'captions': [e['caption']]}) + '\n' for e in examples))

  records = [dict(image=png(e['image']), caption=e['caption'], label=e['label']) for e in examples]
  for part in range(3):     # one file per part, so the file order is the example order
    shards.write_tfrecord_shards(records[part * 7:(part + 1) * 7], str(root / 'tfrecords'), 1,
                                 prefix=f'part{part}')
  (root / 'tars').mkdir()
  for part, chunk in enumerate((examples[:11], examples[11:])):
    with tarfile.open(root / 'tars' / f'{part:05d}.tar', 'w') as tar:
      for e in chunk:
        key = f'{examples.index(e):06d}'
        _add_member(tar, f'{key}.png', png(e['image']))
        _add_member(tar, f'{key}.txt', e['caption'].encode())
        _add_member(tar, f'{key}.cls', str(e['label']).encode())
  for folder in ('tfrecords', 'tars'):
    (root / folder / 'classnames.txt').write_text('\n'.join(CLASSES) + '\n')

  class EvalPictures(tfds.core.GeneratorBasedBuilder):
    """The same pictures, kept in generation order."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                   features=tfds.features.FeaturesDict({
                                       'image': tfds.features.Image(shape=(None, None, 3),
                                                                    encoding_format='png'),
                                       'label': tfds.features.ClassLabel(names=CLASSES)}))

    def _split_generators(self, dl_manager):
      return {'test': self._generate_examples()}

    def _generate_examples(self):
      for i, e in enumerate(examples):
        yield i, {'image': e['image'], 'label': e['label']}

  EvalPictures(data_dir=str(root / 'tfds')).download_and_prepare()
  specs = {'pics': f'folder:{root / "pics"}', 'eval_pictures': 'tfds:eval_pictures',
           'tfrecords': f'shards:{root / "tfrecords"}/*.tfrecord',
           'tars': f'shards:{root / "tars"}/{{00000..00001}}.tar'}
  return dict(specs=specs, data_dir=str(root / 'tfds'), examples=examples)


def _open(stored, spec, **kwargs):
  return ds.open_dataset(spec, split='test', image_size=IMAGE_SIZE,
                         data_dir=stored['data_dir'], **kwargs)


def _real_rows(batches):
  """index, label and pixels of the unmasked rows of one host's batches."""
  batches = list(batches)
  mask = np.concatenate([b['mask'] for b in batches])
  return (len(batches), *(np.concatenate([b[k] for b in batches])[mask]
                          for k in ('index', 'label', 'image')))


def test_every_source_gives_the_same_pixels_as_open_clips_transform(stored):
  mesh = make_mesh()
  examples = stored['examples']
  want = np.stack([eval_input.image_pixels(e['image'], IMAGE_SIZE) for e in examples])
  assert all(w > IMAGE_SIZE and h > IMAGE_SIZE and w != h for w, h in SIZES)   # all resized
  for name, spec in stored['specs'].items():
    data = _open(stored, spec)
    assert data.name == name and data.num_examples == len(examples), name
    assert data.classnames == list(CLASSES), name
    _, index, label, image = _real_rows(data.batches(GLOBAL_BATCH, mesh))
    np.testing.assert_array_equal(index, np.arange(len(examples)), err_msg=name)
    np.testing.assert_array_equal(label, [e['label'] for e in examples], err_msg=name)
    np.testing.assert_array_equal(image, want, err_msg=name)     # bit for bit
    assert not data.skipped


@pytest.mark.torch
def test_the_pixels_are_open_clips(stored):
  from open_clip.transform import image_transform
  transform = image_transform(IMAGE_SIZE, is_train=False)
  for e in stored['examples']:
    theirs = transform(Image.fromarray(e['image'])).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(eval_input.image_pixels(e['image'], IMAGE_SIZE), theirs,
                               atol=1e-5)


def test_two_hosts_read_every_example_once_from_every_source(stored, monkeypatch):
  mesh = make_mesh()
  whole = {}
  for name, spec in stored['specs'].items():
    whole[name] = _real_rows(_open(stored, spec).batches(GLOBAL_BATCH, mesh))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for name, spec in stored['specs'].items():
    hosts = []
    for host in (0, 1):
      monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
      hosts.append(_real_rows(_open(stored, spec).batches(GLOBAL_BATCH, mesh)))
    # The same number of batches on both (host 1's second one is all padding); each host
    # the contiguous half of each global batch; together every example once.
    assert [h[0] for h in hosts] == [2, 2], name
    np.testing.assert_array_equal(hosts[0][1], list(range(8)) + list(range(16, 21)))
    np.testing.assert_array_equal(hosts[1][1], range(8, 16))
    for rows in hosts:
      np.testing.assert_array_equal(rows[2], whole[name][2][rows[1]], err_msg=name)
      np.testing.assert_array_equal(rows[3], whole[name][3][rows[1]], err_msg=name)


def test_every_source_gives_the_same_features_and_scores(stored):
  model = ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=0))
  mesh = make_mesh()
  features = {name: image_features(_open(stored, spec), model.module, model.variables, mesh,
                                   GLOBAL_BATCH)['features']
              for name, spec in stored['specs'].items()}
  for name, value in features.items():
    np.testing.assert_array_equal(value, features['pics'], err_msg=name)
  cfg = get_config('tiny').eval
  streams = [stored['specs'][n] for n in ('tfrecords', 'tars')]
  cfg.update(zeroshot=','.join(stored['specs'].values()),
             retrieval=','.join([stored['specs']['pics']] + streams),
             data_dir=stored['data_dir'], batch_size=GLOBAL_BATCH, split='test', classnames='',
             max_examples=0)
  results = run_evaluations(cfg, model.module, model.variables, mesh, _hash_tokenizer)
  for task, names in (('zeroshot', stored['specs']), ('retrieval', ('tfrecords', 'tars'))):
    reference = {k.split('/', 2)[2]: v for k, v in results.items()
                 if k.startswith(f'{task}/pics/')}
    assert reference['num_examples'] == len(stored['examples'])
    for name in names:
      assert {k.split('/', 2)[2]: v for k, v in results.items()
              if k.startswith(f'{task}/{name}/')} == reference, (task, name)


def test_counts_stop_at_max_examples_and_are_read_once(tmp_path, monkeypatch):
  records = [dict(image=b'x', caption=f'c{i}') for i in range(1000)]
  shards.write_tfrecord_shards(records, str(tmp_path), 1)
  source = sources.Source(kind='tfrecord', pattern=f'{tmp_path}/*.tfrecord')
  read = []
  original = tfrecord.read_records

  def counting(stream, path):
    for record in original(stream, path):
      read.append(1)
      yield record

  monkeypatch.setattr(sources.tfrecord, 'read_records', counting)
  assert pipeline.count_examples(source, 5) == 5
  assert len(read) < len(records)        # not read to the end for 5 examples
  data = ds.open_dataset(f'shards:{tmp_path}/*.tfrecord', image_size=IMAGE_SIZE, max_examples=20)
  assert data.num_examples == 20 and len(list(data.batches(8, make_mesh()))) == 3
  assert pipeline.count_examples(source) == len(records)
  monkeypatch.setattr(sources.Source, 'read_file',
                      lambda *args: pytest.fail('an eval set was counted twice'))
  assert pipeline.count_examples(source) == len(records)
  assert pipeline.count_examples(source, 7) == 7
