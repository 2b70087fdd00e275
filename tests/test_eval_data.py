"""Evaluation datasets: the image folder (classes, captions, corrupt files, open_clip's
preprocessing), the built-in scenes, and `run_evaluations` end to end on 8 fake devices."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax.api import ClipModel
from clip_jax.config import get_config
from clip_jax.evaluate import datasets as ds
from clip_jax.evaluate.run import markdown_table, run_evaluations
from clip_jax.models import model_config
from clip_jax.sharding import make_mesh, replicated
from test_eval_features import random_variables

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'deep_blue': (20, 40, 230)}


def make_folder(root, per_class=4, corrupt=True, captions=True):
  """class_name/*.{jpg,png} of varied, non-square sizes, a corrupt file, captions.jsonl."""
  rng = np.random.default_rng(0)
  records = []
  for name, colour in COLOURS.items():
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      w, h = int(rng.integers(30, 70)), int(rng.integers(30, 70))
      pixels = np.clip(np.array(colour) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
      path = f'{name}/img{i}.' + ('png' if i % 2 else 'jpg')
      Image.fromarray(pixels).save(root / path)
      records.append({'image': path, 'captions': [f'a {name} picture', f'something {name}']})
  if corrupt:
    (root / 'red' / 'broken.jpg').write_bytes(b'not an image at all')
    records.append({'image': 'red/broken.jpg', 'captions': ['a broken red picture']})
  if captions:
    with open(root / 'captions.jsonl', 'w') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')
  return records


def test_image_folder_classes_labels_and_corrupt_files(tmp_path):
  make_folder(tmp_path, captions=False)
  data = ds.image_folder(str(tmp_path), 32)
  assert data.classnames == ['deep blue', 'green', 'red']        # sorted folder names, '_' -> ' '
  assert data.num_examples == 13 and data.captions is None
  mesh = make_mesh()
  batches = list(data.batches(8, mesh))
  rows = {int(i): int(l) for b in batches for i, l, m in zip(b['index'], b['label'], b['mask'])
          if m}
  assert len(rows) == 12                                          # the corrupt file is masked
  assert len(data.skipped) == 1 and 'broken.jpg' in data.skipped[0]
  assert sorted(set(rows.values())) == [0, 1, 2]
  image = next(b['image'][0] for b in batches)
  assert image.shape == (32, 32, 3) and image.dtype == np.float32
  subset = ds.image_folder(str(tmp_path), 32, max_examples=6)
  rows = [r for b in subset.batches(8, mesh) for r in zip(b['index'], b['label'], b['mask'])]
  assert subset.num_examples == 6 and len({int(l) for _, l, _ in rows}) > 1   # not one class
  with pytest.raises(FileNotFoundError, match='not a directory'):
    ds.image_folder(str(tmp_path / 'missing'), 32)


def test_captions_jsonl_and_its_errors(tmp_path):
  make_folder(tmp_path, corrupt=False)
  data = ds.open_dataset(f'folder:{tmp_path}', image_size=32)
  assert data.num_examples == 12 and data.captions[0] == ['a red picture', 'something red']
  (tmp_path / 'captions.jsonl').write_text('{"image": "red/img0.jpg"}\n')
  with pytest.raises(ValueError, match=r'captions.jsonl:1: expected a JSON object'):
    ds.image_folder(str(tmp_path), 32)
  (tmp_path / 'captions.jsonl').write_text('{"image": "nope.jpg", "captions": ["x"]}\n')
  with pytest.raises(ValueError, match=r"captions.jsonl:1: image 'nope.jpg' is not an image"):
    ds.image_folder(str(tmp_path), 32)
  with pytest.raises(ValueError, match='expected builtin, builtin_seen, builtin_captions, folder'):
    ds.open_dataset('ftp:somewhere', image_size=32)


@pytest.mark.torch
def test_preprocessing_matches_open_clip_eval_transform(tmp_path):
  """Bicubic resize of the shorter side + centre crop + CLIP mean/std, as open_clip."""
  from open_clip.transform import image_transform
  transform = image_transform(48, is_train=False)
  rng = np.random.default_rng(0)
  for w, h in ((97, 61), (40, 90), (48, 48), (200, 201)):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / f'{w}x{h}.png'
    Image.fromarray(pixels).save(path)
    ours = ds.load_image(str(path), 48)
    with Image.open(path) as image:
      theirs = transform(image).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _hash_tokenizer(texts):
  out = np.zeros((len(texts), 16), np.int32)
  for row, text in enumerate(texts):
    text = text.decode() if isinstance(text, bytes) else str(text)   # tf.data passes bytes
    ids = [2] + [4 + sum(map(ord, w)) % 500 for w in text.split()][:14] + [3]
    out[row, :len(ids)] = ids
  return out


_hash_tokenizer.context_length = 16


@pytest.fixture(scope='module')
def tiny():
  return ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=0))


def test_run_evaluations_end_to_end(tiny, tmp_path, capsys):
  make_folder(tmp_path / 'pics')
  model = tiny
  mesh = make_mesh()
  variables = jax.device_put(model.variables, replicated(mesh))
  cfg = get_config('tiny').eval
  cfg.update(zeroshot=f'builtin_seen,builtin,folder:{tmp_path / "pics"}',
             retrieval='builtin,builtin_captions',
             linear_probe=f'folder:{tmp_path / "pics"}', train_split='test', batch_size=16,
             max_examples=40, cache_dir=str(tmp_path / 'run' / 'eval_cache'))
  workdir = str(tmp_path / 'run')
  results = run_evaluations(cfg, model.module, variables, mesh, _hash_tokenizer, workdir, step=7)
  for key in ('zeroshot/builtin_test/top1', 'zeroshot/builtin_test/top5',
              'zeroshot/builtin_test/mean_per_class', 'zeroshot/pics/top1',
              'retrieval/builtin_test/image_to_text_R10',
              'retrieval/builtin_test/text_to_image_R1',
              'linear_probe/pics/accuracy', 'linear_probe/pics/C'):
    assert key in results, key
  assert results['zeroshot/builtin_test/num_examples'] == 40
  assert results['zeroshot/builtin_seen_test/num_examples'] == 40
  assert results['retrieval/builtin_captions_test/num_examples'] == 40
  assert 'retrieval/builtin_captions_test/text_to_image_R1' in results
  assert results['zeroshot/pics/num_examples'] == 12           # 13 files, one unreadable
  assert results['zeroshot/pics/num_skipped'] == 1
  assert 'zeroshot/builtin_test/num_skipped' not in results
  assert all(0 <= v <= 100 for k, v in results.items() if k.endswith(('top1', 'R1')))
  assert results['linear_probe/pics/accuracy'] == 100.0         # three flat colours
  saved = json.loads((tmp_path / 'run' / 'eval_results.json').read_text())
  assert saved['step'] == 7 and saved['metrics'] == pytest.approx(results)
  history = (tmp_path / 'run' / 'eval_results.jsonl').read_text().splitlines()
  assert len(history) == 1
  printed = capsys.readouterr().out
  assert '| zeroshot | builtin_test | top1 |' in printed and 'eval_results.json' in printed
  # One cached classifier per zero-shot dataset (the two built-in sets share prompts and
  # classes, so one file), for the next evaluation of these weights.
  assert len(list((tmp_path / 'run' / 'eval_cache').glob('zeroshot_*.npy'))) == 2
  assert markdown_table({'a/b/C': 0.001}).endswith('| a | b | C | 0.001 |')


def test_shards_through_the_pipeline_agree_with_the_image_folder(tiny, tmp_path):
  """The same 32x32 PNGs as an image folder and as TFRecord shards (read by tf.data on the
  mesh): same examples counted once, same zero-shot and retrieval scores."""
  from clip_jax.data import write_tfrecord_shards
  rng = np.random.default_rng(0)
  records = []
  for label, (name, colour) in enumerate(sorted(COLOURS.items())):
    os.makedirs(tmp_path / 'pics' / name)
    for i in range(7):
      pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
      path = tmp_path / 'pics' / name / f'{i}.png'
      Image.fromarray(pixels).save(path)
      records.append({'image': path.read_bytes(), 'caption': [f'a {name} picture {i}'],
                      'label': label})
  with open(tmp_path / 'pics' / 'captions.jsonl', 'w') as f:
    for r in records:
      name = sorted(COLOURS)[r['label']]
      f.write(json.dumps({'image': f'{name}/{r["caption"][0].split()[-1]}.png',
                          'captions': r['caption']}) + '\n')
  write_tfrecord_shards(records, str(tmp_path / 'shards'), num_shards=3)
  model = tiny
  (tmp_path / 'shards' / 'classnames.txt').write_text(
      '\n'.join(n.replace('_', ' ') for n in sorted(COLOURS)) + '\n')
  mesh = make_mesh()
  cfg = get_config('tiny').eval
  cfg.update(zeroshot=f'folder:{tmp_path / "pics"},shards:{tmp_path / "shards"}/*.tfrecord',
             retrieval=f'folder:{tmp_path / "pics"},shards:{tmp_path / "shards"}/*.tfrecord',
             batch_size=16, classnames='')
  results = run_evaluations(cfg, model.module, model.variables, mesh, _hash_tokenizer)
  assert results['zeroshot/shards/num_examples'] == 21
  for metric in ('top1', 'top5', 'mean_per_class'):
    assert results[f'zeroshot/shards/{metric}'] == pytest.approx(results[f'zeroshot/pics/{metric}'])
  for metric in ('image_to_text_R1', 'text_to_image_R5'):
    assert results[f'retrieval/shards/{metric}'] == pytest.approx(
        results[f'retrieval/pics/{metric}'])


def test_tfds_by_name_from_data_dir_matches_the_image_folder(tiny, tmp_path):
  """A TFDS dataset prepared here (nothing downloaded): class names from its ClassLabel,
  splits by name; the same pictures as an image folder score the same."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(1)
  names = sorted(COLOURS)
  pictures = {split: [(label, np.clip(np.array(COLOURS[name]) + rng.normal(0, 40, (32, 32, 3)),
                                      0, 255).astype(np.uint8))
                      for label, name in enumerate(names) for _ in range(count)]
              for split, count in (('train', 6), ('test', 5))}

  class EvalColours(tfds.core.GeneratorBasedBuilder):
    """Flat colours, three classes."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(32, 32, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(names=names)}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in pictures}

    def _generate_examples(self, split):
      for i, (label, image) in enumerate(pictures[split]):
        yield i, {'image': image, 'label': label}

  EvalColours(data_dir=str(tmp_path / 'tfds')).download_and_prepare()
  for i, (label, image) in enumerate(pictures['test']):
    os.makedirs(tmp_path / 'pics' / names[label], exist_ok=True)
    Image.fromarray(image).save(tmp_path / 'pics' / names[label] / f'{i}.png')
  data = ds.open_dataset('tfds:eval_colours', split='test', image_size=32,
                         data_dir=str(tmp_path / 'tfds'))
  assert data.classnames == ['deep blue', 'green', 'red'] and data.num_examples == 15
  cfg = get_config('tiny').eval
  cfg.update(zeroshot=f'tfds:eval_colours,folder:{tmp_path / "pics"}',
             linear_probe='tfds:eval_colours', data_dir=str(tmp_path / 'tfds'), batch_size=16)
  results = run_evaluations(cfg, tiny.module, tiny.variables, make_mesh(), _hash_tokenizer)
  assert results['zeroshot/eval_colours/num_examples'] == 15
  for metric in ('top1', 'top5', 'mean_per_class'):
    assert results[f'zeroshot/eval_colours/{metric}'] == pytest.approx(
        results[f'zeroshot/pics/{metric}'])
  assert results['linear_probe/eval_colours/accuracy'] == 100.0    # fitted on 'train'
  with pytest.raises(ValueError, match='nothing is downloaded'):
    ds.open_dataset('tfds:eval_colours', image_size=32, data_dir=str(tmp_path / 'elsewhere'))


def _rows(data):
  """(label, pixels as bytes) of every real (unpadded) example the evaluation reads."""
  return [(int(label), image.tobytes()) for b in data.batches(256, make_mesh())
          for label, image, keep in zip(b['label'], b['image'], b['mask']) if keep]


def test_builtin_sets_show_their_pairs_and_no_training_image_or_caption():
  """Held-out: only held-out pairs; seen and retrieval: only seen pairs; none of the
  default run's training images (its seed, the first 1,000 scenes) or captions."""
  from clip_jax.data import builtin
  train_seed = get_config('tiny').builtin.seed
  training = list(builtin.scenes(1000, seed=train_seed, held_out=False))
  train_images = {ds.normalize_pixels(r['image']).tobytes() for r in training}
  train_captions = {c for r in training for c in r['caption']}
  held_out = {builtin.label_of(c, s) for c, s in builtin.HELD_OUT}
  seen = set(range(len(builtin.class_names()))) - held_out
  expected = {('builtin', 'test'): held_out, ('builtin', 'train'): seen,
              ('builtin_seen', 'test'): seen, ('builtin_seen', 'train'): seen,
              ('builtin_captions', 'test'): seen}
  assert {(spec, split) for spec, s in ds.BUILTIN_SETS.items() for split in s.splits} == set(
      expected)
  keys = {}
  for (spec, split), labels in expected.items():
    data = ds.open_dataset(spec, split=split, image_size=32)
    assert data.name == ds.builtin_name(spec, split)
    assert data.num_examples == ds.BUILTIN_SETS[spec].size
    assert data.classnames == builtin.class_names()
    rows = _rows(data)
    assert {label for label, _ in rows} == labels, (spec, split)   # all of them, nothing else
    keys[spec, split] = {image for _, image in rows}
    assert len(keys[spec, split]) == data.num_examples
    assert not keys[spec, split] & train_images, (spec, split)
  # The seen test set is new images, not the probe's.
  assert not keys['builtin_seen', 'test'] & keys['builtin_seen', 'train']
  retrieval = ds.open_dataset('builtin_captions', image_size=32)
  assert not {c for cs in retrieval.captions for c in cs} & train_captions
  with pytest.raises(ValueError, match="builtin_captions: unknown split 'train'"):
    ds.open_dataset('builtin_captions', split='train', image_size=32)


def test_summary_one_line_per_metric_held_out_last():
  from clip_jax.train import zeroshot_summary
  results = {'zeroshot/builtin_test/top1': 40.0, 'zeroshot/builtin_test/top5': 99.0,
             'zeroshot/builtin_seen_test/top1': 81.25, 'zeroshot/pics/top1': 50.0,
             'retrieval/builtin_captions_test/text_to_image_R1': 12.5,
             'retrieval/builtin_captions_test/image_to_text_R1': 9.0,
             'retrieval/builtin_captions_test/num_examples': 200.0}
  assert zeroshot_summary(results).splitlines() == [
      'zero-shot top-1 on seen pairs, new images: 81.2% (chance 2.8%)',
      'zero-shot top-1 on pics: 50.0%',
      'text->image R@1 on held-out captions: 12.5% (chance 0.5%)',
      'zero-shot top-1 on held-out: 40.0% (chance 2.8%)']
  # The probe split of the built-in scenes shows seen pairs: not called held-out.
  assert zeroshot_summary({'zeroshot/builtin_train/top1': 1.0}) == (
      'zero-shot top-1 on builtin_train: 1.0%')
