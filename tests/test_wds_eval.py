"""clip_benchmark's webdataset layout (`wds:ROOT`), written here with webdataset's own
ShardWriter as clip_benchmark's exporter writes it: read in webdataset's sample order with
its image member choice, the set's own class names and `{c}` templates, every caption of
a retrieval image, two hosts each decoding only their part of every global batch, one
pass, and the failures named. The photographs are scikit-image's samples, cropped to
varied sizes and stored in each of the four image formats, so that resize and crop matter.

Also home of the helpers the suite and parity tests share (layouts, a small CLIP-BPE model).
"""

import io
import json
import os

import jax
import numpy as np
import pytest
import skimage
import webdataset
from PIL import Image

from clip_jax import checkpoint
from clip_jax.api import ClipModel
from clip_jax.config import get_config
from clip_jax.data import eval_input
from clip_jax.evaluate import datasets as ds
from clip_jax.evaluate import wds
from clip_jax.evaluate.run import (evaluate_retrieval, evaluate_zeroshot, image_features,
                                   text_encoder)
from clip_jax.evaluate.zeroshot import zeroshot_classifier
from clip_jax.models import model_config
from clip_jax.models import openai_constants as openai
from clip_jax.sharding import make_mesh
from test_eval_data import _hash_tokenizer
from test_eval_features import random_variables

IMAGE_SIZE = 32
# scikit-image's bundled photographs (RGB, grayscale and RGBA; 102 to 1411 px).
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'motorcycle_left', 'hubble_deep_field',
          'retina', 'ihc', 'camera', 'horse', 'coins', 'page', 'color', 'logo')
CLASSNAMES = ('astronaut', 'cat', 'coffee cup', 'rocket', 'motorcycle', 'galaxy', 'retina',
              'tissue', 'cameraman', 'horse')
TEMPLATES = ('a photo of a {c}.', 'a close-up photo of the {c}.', 'itap of my {c}')
FORMATS = {'webp': dict(format='webp', lossless=True), 'png': dict(format='png'),
           'jpg': dict(format='jpeg', quality=90), 'jpeg': dict(format='jpeg', quality=75)}


def photo(name: str) -> Image.Image:
  path = os.path.join(os.path.dirname(skimage.__file__), 'data', f'{name}.png')
  path = path if os.path.exists(path) else path[:-4] + '.jpg'
  with Image.open(path) as image:
    image.load()
    return image


def crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """A random crop with a random aspect ratio (from 1:2.5 to 2.5:1), at least 40 px a side."""
  width, height = image.size
  w = int(rng.integers(max(40, width // 3), width + 1))
  h = int(np.clip(w / np.exp(rng.uniform(-0.9, 0.9)), 40, height))
  left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
  return image.crop((left, top, left + w, top + h))


def encode(image: Image.Image, extension: str) -> bytes:
  options = FORMATS[extension]
  if options['format'] == 'jpeg' and image.mode not in ('RGB', 'L'):
    image = image.convert('RGB')     # JPEG has no alpha
  buffer = io.BytesIO()
  image.save(buffer, **options)
  return buffer.getvalue()


def classification_samples(per_class: int, seed: int = 0) -> list[dict]:
  """`per_class` crops of each of the 10 class photographs, formats in turn; in class order
  shuffled (a stream is not sorted by class)."""
  rng = np.random.default_rng(seed)
  samples = []
  for label, name in enumerate(PHOTOS[:len(CLASSNAMES)]):
    source = photo(name)
    for i in range(per_class):
      extension = list(FORMATS)[(label + i) % len(FORMATS)]
      samples.append({extension: encode(crop(source, rng), extension), 'cls': label})
  order = rng.permutation(len(samples))
  return [samples[i] for i in order]


def retrieval_samples(count: int, seed: int = 1) -> list[dict]:
  """Crops of the photographs with 3 to 5 captions each (their own words, numbered)."""
  rng = np.random.default_rng(seed)
  samples = []
  for i in range(count):
    name = PHOTOS[i % len(PHOTOS)]
    extension = list(FORMATS)[i % len(FORMATS)]
    captions = [f'{name.replace("_", " ")} picture {i} view {j}'
                for j in range(int(rng.integers(3, 6)))]
    samples.append({extension: encode(crop(photo(name), rng), extension),
                    'txt': '\n'.join(captions)})
  return samples


def write_wds(root, samples: list[dict], *, per_shard: int = 16, classnames=None, templates=None,
              dataset_type: str | None = None, split: str = 'test') -> str:
  """The layout clip_benchmark's webdataset_builder.convert_dataset writes (its ShardWriter,
  keys s0000000..., nshards.txt, side files ending in a newline); returns the root."""
  folder = os.path.join(root, split)
  os.makedirs(folder, exist_ok=True)
  sink = webdataset.ShardWriter(os.path.join(folder, '%d.tar'), maxcount=per_shard, verbose=0)
  for index, sample in enumerate(samples):
    sink.write(dict(sample, __key__=f's{index:07d}'))
  num_shards = sink.shard
  sink.close()
  with open(os.path.join(folder, 'nshards.txt'), 'w') as f:
    print(num_shards, end='\n', file=f)
  for name, lines in ((wds.CLASSNAMES_FILE, classnames), (wds.TEMPLATES_FILE, templates),
                      (wds.TYPE_FILE, [dataset_type] if dataset_type else None)):
    if lines is not None:
      with open(os.path.join(root, name), 'w') as f:
        print(*lines, sep='\n', end='\n', file=f)
  return str(root)


def small_clip_config(image_size: int = IMAGE_SIZE):
  """An experiment config for a small model with OpenAI's vocabulary (CLIP BPE tokenizer,
  argmax pooling), so that open_clip and clip_benchmark can run its export."""
  return get_config('tiny', vision=dict(type='vit', image_size=image_size, patch_size=8,
                                        width=64, layers=2, heads=2),
                    text=dict(context_length=24, vocab_size=openai.VOCAB_SIZE, width=64, heads=2,
                              layers=2),
                    text_pool='argmax', eot_token_id=openai.EOT_TOKEN_ID)


def small_clip_workdir(path, image_size: int = IMAGE_SIZE, seed: int = 0) -> ClipModel:
  """Writes a random-init small CLIP-BPE model as a clip_jax workdir; returns its handle."""
  config = small_clip_config(image_size)
  variables = random_variables(config.model, seed)
  checkpoint.save_model(str(path), config, variables)
  return ClipModel(config.model, variables, config)


def webdataset_reference(root: str, split: str = 'test') -> list[tuple]:
  """(image, cls or txt) per sample as clip_benchmark's build_wds_dataset reads them."""
  nshards = int(open(os.path.join(root, split, 'nshards.txt')).read())
  pattern = os.path.join(root, split, '{0..%d}.tar' % (nshards - 1))
  kind = open(os.path.join(root, 'dataset_type.txt')).read().strip() if os.path.exists(
      os.path.join(root, 'dataset_type.txt')) else 'classification'
  dataset = webdataset.WebDataset(pattern, shardshuffle=False, nodesplitter=lambda src: src)
  dataset = dataset.decode(webdataset.autodecode.ImageHandler(
      'pil', extensions=['webp', 'png', 'jpg', 'jpeg']))
  second = 'txt' if kind == 'retrieval' else 'cls'
  return list(dataset.to_tuple(['webp', 'png', 'jpg', 'jpeg'], second))


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
  root = tmp_path_factory.mktemp('wds')
  return dict(
      classification=write_wds(root / 'cls', classification_samples(3), per_shard=11,
                               classnames=CLASSNAMES, templates=TEMPLATES),
      retrieval=write_wds(root / 'ret', retrieval_samples(13), per_shard=5,
                          dataset_type='retrieval'))


def _rows(data, mesh, batch=16):
  batches = list(data.batches(batch, mesh))
  mask = np.concatenate([b['mask'] for b in batches])
  return len(batches), {k: np.concatenate([b[k] for b in batches])[mask]
                        for k in ('index', 'label', 'image')}


def test_read_in_webdatasets_order_with_its_member_choice_and_open_clips_pixels(sets):
  root = sets['classification']
  reference = webdataset_reference(root)
  layout = wds.read_layout(root)
  assert layout.dataset_type == 'classification' and len(layout.shards) == 3   # 30 = 11+11+8
  assert layout.classnames == CLASSNAMES and layout.templates == TEMPLATES
  data = ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
  assert data.num_examples is None          # not counted before the one pass
  num_batches, rows = _rows(data, make_mesh())
  assert num_batches == 2 and data.num_examples == len(reference) == 30 and not data.skipped
  np.testing.assert_array_equal(rows['index'], np.arange(30))
  np.testing.assert_array_equal(rows['label'], [label for _, label in reference])
  want = np.stack([eval_input.image_pixels(image, IMAGE_SIZE) for image, _ in reference])
  np.testing.assert_array_equal(rows['image'], want)
  sizes = {image.size for image, _ in reference}
  assert len(sizes) == 30 and all(min(s) > IMAGE_SIZE for s in sizes)   # every one resized


def test_two_hosts_decode_only_their_part_and_agree_on_everything_else(sets, monkeypatch):
  mesh = make_mesh()
  root = sets['retrieval']
  whole = ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
  _, everything = _rows(whole, mesh, batch=8)
  decoded = {0: 0, 1: 0}
  original = wds.decode_images
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  hosts = []
  for host in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)

    def counting(items, size, host=host):
      decoded[host] += len(items)
      return original(items, size)

    monkeypatch.setattr(wds, 'decode_images', counting)
    data = ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
    hosts.append((*_rows(data, mesh, batch=8), data))
  # 13 examples, global batch 8 (4 per host): 2 batches each; host 0 reads 0-3 and 8-11,
  # host 1 reads 4-7 and 12; each decodes only those.
  assert [h[0] for h in hosts] == [2, 2] and decoded == {0: 8, 1: 5}
  np.testing.assert_array_equal(hosts[0][1]['index'], [0, 1, 2, 3, 8, 9, 10, 11])
  np.testing.assert_array_equal(hosts[1][1]['index'], [4, 5, 6, 7, 12])
  for _, rows, data in hosts:
    np.testing.assert_array_equal(rows['image'], everything['image'][rows['index']])
    assert data.captions == whole.captions and data.num_examples == 13   # all of them, both


def test_retrieval_scores_every_caption_like_the_same_images_as_a_folder(sets, tmp_path):
  """The same images and captions as an image folder with captions.jsonl: equal recalls."""
  model = ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=0))
  mesh = make_mesh()
  reference = webdataset_reference(sets['retrieval'])
  lines = []
  for i, (image, captions) in enumerate(reference):
    image.save(tmp_path / f'{i:03d}.png')
    lines.append(json.dumps({'image': f'{i:03d}.png', 'captions': captions.splitlines()}))
  (tmp_path / 'captions.jsonl').write_text('\n'.join(lines) + '\n')
  data = ds.open_dataset(f'wds:{sets["retrieval"]}', image_size=IMAGE_SIZE)
  ours = evaluate_retrieval(data, model.module, model.variables, mesh, _hash_tokenizer,
                            batch_size=8)
  assert [len(c) for c in data.captions] == [len(c.splitlines()) for _, c in reference]
  assert sum(len(c) for c in data.captions) > 3 * len(reference)       # several per image
  folder = ds.open_dataset(f'folder:{tmp_path}', image_size=IMAGE_SIZE)
  assert ours == evaluate_retrieval(folder, model.module, model.variables, mesh,
                                    _hash_tokenizer, batch_size=8)
  assert ours['num_examples'] == 13


def test_the_sets_own_classnames_and_c_templates_make_the_classifier(sets):
  model = ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=1))
  mesh = make_mesh()
  data = ds.open_dataset(f'wds:{sets["classification"]}', image_size=IMAGE_SIZE)
  encode = text_encoder(model.module, model.variables, mesh, 16)
  # The same prompts written out by hand, with our `{}` placeholder.
  manual = [t.replace('{c}', '{}') for t in TEMPLATES]
  want = zeroshot_classifier(encode, _hash_tokenizer, CLASSNAMES, manual, 16)
  got = zeroshot_classifier(encode, _hash_tokenizer, data.classnames, data.templates, 16)
  np.testing.assert_array_equal(got, want)
  metrics = evaluate_zeroshot(data, model.module, model.variables, mesh, _hash_tokenizer,
                              batch_size=16, templates=data.templates)
  feats = image_features(data, model.module, model.variables, mesh, 16)
  top1 = 100 * np.mean(np.argmax(feats['features'] @ want.T, -1) == feats['label'])
  assert metrics['top1'] == pytest.approx(top1) and metrics['num_examples'] == 30


def test_max_examples_stops_the_stream(sets, monkeypatch):
  from clip_jax.data import sources
  read = []
  original = sources.wds_members

  def counting(*args):
    for member in original(*args):
      read.append(member[0])
      yield member

  monkeypatch.setattr(sources, 'wds_members', counting)
  data = ds.open_dataset(f'wds:{sets["classification"]}', image_size=IMAGE_SIZE, max_examples=5)
  _, rows = _rows(data, make_mesh(), batch=8)
  assert data.num_examples == 5 and list(rows['index']) == [0, 1, 2, 3, 4]
  assert len(set(read)) <= 6                 # the 6th sample's first member ends the 5th
  assert read[-1] != read[0]


def test_broken_layouts_and_samples_are_named(tmp_path):
  mesh = make_mesh()
  good = classification_samples(1)
  with pytest.raises(FileNotFoundError, match=r'test/nshards.txt: no such file'):
    ds.open_dataset(f'wds:{tmp_path}', image_size=IMAGE_SIZE)
  root = write_wds(tmp_path / 'a', good, per_shard=4, classnames=CLASSNAMES, templates=TEMPLATES)
  os.remove(os.path.join(root, 'test', '1.tar'))
  with pytest.raises(FileNotFoundError, match=r'1 of the 3 shards .* missing, e\.g\. .*1\.tar'):
    ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
  root = write_wds(tmp_path / 'b', good, dataset_type='multilabel')
  with pytest.raises(ValueError, match=r"dataset_type.txt: dataset type 'multilabel' is not "):
    ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
  root = write_wds(tmp_path / 'c', good, templates=('a {c} of {thing}',))
  with pytest.raises(ValueError, match=r'templates.txt:1: template .* cannot be filled'):
    ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
  # A sample without a label, one without an image, one whose image is corrupt: masked
  # out and named; the others are read.
  broken = [dict(good[0]), {'cls': 3}, {'png': b'not a png', 'cls': 4}] + good[1:4]
  del broken[0]['cls']
  root = write_wds(tmp_path / 'd', broken, classnames=CLASSNAMES, templates=TEMPLATES)
  data = ds.open_dataset(f'wds:{root}', image_size=IMAGE_SIZE)
  _, rows = _rows(data, mesh, batch=8)
  assert list(rows['index']) == [3, 4, 5] and data.num_examples == 6
  assert len(data.skipped) == 3
  assert 'example 0 (s0000000): no integer label (cls)' in data.skipped[0]
  assert 'example 1 (s0000001): no image member' in data.skipped[1]
  assert 'example 2 (s0000002): ' in data.skipped[2]
  with pytest.raises(ValueError, match='no captions; retrieval needs'):
    model = ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=0))
    evaluate_retrieval(data, model.module, model.variables, mesh, _hash_tokenizer, batch_size=8)


def test_the_evaluate_cli_scores_wds_sets(sets, tmp_path, capsys):
  """`python -m clip_jax.evaluate --dataset=wds:ROOT`, classification and retrieval."""
  from clip_jax.evaluate import __main__ as evaluate_cli
  small_clip_workdir(tmp_path / 'run')
  common = ['--workdir', str(tmp_path / 'run'), '--batch_size', '16']
  zeroshot = evaluate_cli.main(common + ['--task', 'zeroshot',
                                         '--dataset', f'wds:{sets["classification"]}'])
  assert zeroshot['zeroshot/cls/num_examples'] == 30 and 'zeroshot/cls/top5' in zeroshot
  retrieval = evaluate_cli.main(common + ['--task', 'retrieval',
                                          '--dataset', f'wds:{sets["retrieval"]}'])
  assert retrieval['retrieval/ret/num_examples'] == 13
  assert 'retrieval/ret/text_to_image_R10' in retrieval
  printed = capsys.readouterr().out
  assert '| zeroshot | cls | top1 |' in printed
  assert '| retrieval | ret | image_to_text_R1 |' in printed
  assert json.loads((tmp_path / 'run' / 'eval_results.json').read_text())['metrics'] == retrieval
