"""The built-in scenes: what is drawn matches what is said, held-out pairs stay out, shards."""

import json
import os
import re

import numpy as np
import pytest

from clip_jax.data import builtin


def test_classes_and_held_out_pairs():
  names = builtin.class_names()
  assert len(names) == len(builtin.SHAPES) * len(builtin.COLOURS) == 36
  assert names[builtin.label_of('red', 'circle')] == 'red circle'
  # One held-out pair per shape and per colour: every word is still seen in training.
  assert sorted(s for _, s in builtin.HELD_OUT) == sorted(builtin.SHAPES)
  assert sorted(c for c, _ in builtin.HELD_OUT) == sorted(builtin.COLOURS)


def test_training_scenes_never_show_held_out_pairs_and_captions_say_what_is_drawn():
  held_out_labels = {builtin.label_of(c, s) for c, s in builtin.HELD_OUT}
  train = list(builtin.scenes(300, seed=0, held_out=False))
  assert not {r['label'] for r in train} & held_out_labels
  assert len({r['label'] for r in train}) == 30
  for record in train:
    colour, shape = builtin.class_names()[record['label']].split()
    assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8
    assert len(record['caption']) == 3
    for caption in record['caption']:
      words = caption.replace(',', ' ').replace('.', ' ').split()
      assert colour in words or shape in words, caption
      # Never the wrong colour or shape.
      assert not (set(words) & set(builtin.COLOURS)) - {colour}, caption
      assert not (set(words) & set(builtin.SHAPES)) - {shape}, caption
  held = list(builtin.scenes(100, seed=1, held_out=True))
  assert {r['label'] for r in held} == held_out_labels


def test_scenes_are_deterministic_in_the_seed():
  a = list(builtin.scenes(5, seed=3, held_out=False))
  b = list(builtin.scenes(5, seed=3, held_out=False))
  c = list(builtin.scenes(5, seed=4, held_out=False))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    assert x['caption'] == y['caption']
  assert any(not np.array_equal(x['image'], z['image']) for x, z in zip(a, c))


@pytest.mark.parametrize('colour', list(builtin.COLOURS))
def test_the_shape_has_its_colour(colour):
  rng = np.random.default_rng(0)
  image, _ = builtin.draw_scene(colour, 'square', 'large', rng)
  # The pixels farthest from the background's grey are the shape's.
  pixels = image.reshape(-1, 3).astype(np.float32)
  saturation = pixels.max(1) - pixels.min(1) + pixels.mean(1)
  shape_pixels = pixels[saturation >= np.percentile(saturation, 85)]
  mean = shape_pixels.mean(0)
  distances = {name: np.linalg.norm(mean - np.array(rgb)) for name, rgb in builtin.COLOURS.items()}
  assert min(distances, key=distances.get) == colour, (mean, distances)


def test_place_names():
  assert builtin._place(0.1, 0.1) == 'top left'
  assert builtin._place(0.5, 0.9) == 'bottom'
  assert builtin._place(0.5, 0.5) == 'middle'


def _training_caption_strings():
  """Every string a training template can produce (all colours, shapes, sizes, places)."""
  return {t.format(colour=c, shape=s, size=z, place=p) for t in builtin.CAPTION_TEMPLATES
          for c in builtin.COLOURS for s in builtin.SHAPES for z in builtin.SIZES
          for p in builtin.PLACES}


def _description(caption):
  """(colour, shape, size, place) read back from a RETRIEVAL_TEMPLATES caption."""
  for template in builtin.RETRIEVAL_TEMPLATES:
    pattern = re.escape(template)
    for field in ('colour', 'shape', 'size', 'place'):
      pattern = pattern.replace(re.escape('{%s}' % field), f'(?P<{field}>[a-z ]+?)')
    match = re.fullmatch(pattern, caption)
    if match:
      return match['colour'], match['shape'], match['size'], match['place']
  raise AssertionError(f'not a retrieval caption: {caption!r}')


def test_retrieval_scenes_are_distinct_seen_and_in_phrasings_training_never_uses():
  training = _training_caption_strings()
  records = builtin.retrieval_scenes(200, seed=builtin.EVAL_SEEDS['retrieval'])
  assert len(records) == 200
  held_out_labels = {builtin.label_of(c, s) for c, s in builtin.HELD_OUT}
  descriptions = []
  for record in records:
    assert len(record['caption']) == len(set(record['caption'])) == 2
    assert not set(record['caption']) & training, record['caption']
    said = {_description(c) for c in record['caption']}
    assert len(said) == 1, record['caption']             # both captions say the same
    colour, shape, size, place = said.pop()
    assert record['label'] == builtin.label_of(colour, shape)
    assert record['label'] not in held_out_labels
    assert size in builtin.SIZES and place in builtin.PLACES
    descriptions.append((colour, shape, size, place))
  # No two images fit the same caption.
  assert len(set(descriptions)) == len(descriptions)
  assert builtin.retrieval_scenes(3, seed=4)[0]['caption'] == records[0]['caption']
  with pytest.raises(ValueError, match='distinct scenes'):
    builtin.retrieval_scenes(30 * 2 * 9 + 1, seed=4)


def test_places_are_what_place_names():
  grid = np.linspace(0.05, 0.95, 19)
  assert {builtin._place(x, y) for x in grid for y in grid} == set(builtin.PLACES)


def test_training_refuses_the_evaluation_seeds(tmp_path):
  from clip_jax.config import get_config
  assert get_config('tiny').builtin.seed not in builtin.EVAL_SEEDS.values()
  assert len(set(builtin.EVAL_SEEDS.values())) == len(builtin.EVAL_SEEDS)
  for seed in builtin.EVAL_SEEDS.values():
    with pytest.raises(ValueError, match=f'seed {seed} draws evaluation scenes'):
      builtin.prepare(str(tmp_path), num_train=4, seed=seed)
  assert not os.listdir(tmp_path)


def test_prepare_writes_shards_and_tokenizer_once(tmp_path):
  import tensorflow as tf
  from clip_jax.data.tokenizers import SentencePieceTokenizer
  manifest = builtin.prepare(str(tmp_path), num_train=40, num_shards=4)
  assert len(manifest['files']) == 4 and all(os.path.exists(f) for f in manifest['files'])
  records = [tf.train.Example.FromString(r.numpy())
             for f in manifest['files'] for r in tf.data.TFRecordDataset(f)]
  assert len(records) == 40
  first = records[0].features.feature
  assert len(first['caption'].bytes_list.value) == 3
  image = tf.io.decode_png(first['image'].bytes_list.value[0]).numpy()
  expected = next(builtin.scenes(1, seed=0, held_out=False))
  # Round robin: the first record of the first shard is the first scene, stored losslessly.
  np.testing.assert_array_equal(image, expected['image'])
  assert first['label'].int64_list.value[0] == expected['label']
  tokenizer = SentencePieceTokenizer(manifest['tokenizer'], 16)
  assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (2, 3)
  assert tokenizer.vocab_size <= 512
  # Whole words: the longest caption and every prompt fit the tiny model's 16 tokens.
  texts = [t.format(n) for n in builtin.class_names() for t in builtin.PROMPT_TEMPLATES]
  texts += [c for r in builtin.scenes(200, seed=0, held_out=False) for c in r['caption']]
  # Retrieval's unseen phrasings use training's words only: the tokenizer knows them.
  texts += [c for r in builtin.retrieval_scenes(100, seed=builtin.EVAL_SEEDS['retrieval'])
            for c in r['caption']]
  ids = tokenizer(texts)
  assert (ids[:, -1] == 0).all()          # nothing truncated
  assert (ids == 1).sum() == 0            # nothing unknown
  # A second call reuses what is there; other settings redraw.
  mtime = os.path.getmtime(manifest['files'][0])
  assert builtin.prepare(str(tmp_path), num_train=40, num_shards=4) == manifest
  assert os.path.getmtime(manifest['files'][0]) == mtime
  other = builtin.prepare(str(tmp_path), num_train=20, num_shards=4)
  assert other['num_train'] == 20
  with open(tmp_path / builtin.MANIFEST) as f:
    assert json.load(f)['num_train'] == 20
