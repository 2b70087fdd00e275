"""Feature extraction on 8 fake devices (padding, hosts) and the batched zero-shot classifier."""

import jax
import numpy as np
import pytest

from clip_jax.api import ClipModel
from clip_jax.data.eval_input import pad_batch
from clip_jax.evaluate import features as feat
from clip_jax.evaluate.run import text_encoder
from clip_jax.evaluate.zeroshot import (params_fingerprint, zeroshot_accuracy,
                                        zeroshot_classifier)
from clip_jax.models import model_config, param_shapes
from clip_jax.sharding import make_mesh


@pytest.fixture(scope='module')
def tiny():
  return ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=0))


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == 8
  return make_mesh((-1, 1, 1))


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_padded_eval_set_counts_every_sample_once(tiny, mesh):
  rng = np.random.default_rng(0)
  num = 37                                  # not a multiple of the global batch of 16
  images = rng.normal(size=(num, 32, 32, 3)).astype(np.float32)
  labels = np.arange(num, dtype=np.int32)
  batches = list(feat.array_batches({'image': images, 'label': labels}, 16, mesh))
  assert len(batches) == 3 and all(b['image'].shape[0] == 16 for b in batches)
  assert sum(int(b['mask'].sum()) for b in batches) == num
  out = feat.extract_features(feat.TowerEncoder(tiny.module, 'image'), tiny.variables,
                              iter(batches), mesh)
  np.testing.assert_array_equal(out['label'], labels)       # each sample once, in order
  np.testing.assert_allclose(out['features'], _unit(tiny.encode_image(images)), atol=1e-5)
  # Zero-shot accuracy over the same padded set counts exactly `num` samples: a classifier
  # whose classes are the images themselves gets every one right.
  metrics = zeroshot_accuracy(out['features'], labels, out['features'])
  assert metrics['top1'] == 100.0
  with pytest.raises(ValueError, match='multiple of the 8 data-parallel devices'):
    next(feat.array_batches({'image': images}, 12, mesh))
  assert feat.fit_batch_size(12, mesh) == 16 and feat.fit_batch_size(1, mesh) == 8


def test_hosts_split_each_global_batch_and_agree_on_batch_count(mesh, monkeypatch):
  """Four simulated hosts: every example is read by exactly one host, all yield as many
  batches, and host order inside a global batch is global order."""
  num, global_batch, hosts = 21, 8, 4
  monkeypatch.setattr(jax, 'process_count', lambda: hosts)
  seen, counts = [], []
  for host in range(hosts):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    batches = list(feat.host_batches(num, global_batch, mesh,
                                     lambda idx: {'index': idx.astype(np.int32)}))
    counts.append(len(batches))
    assert all(len(b['index']) == global_batch // hosts for b in batches)
    seen.append([b['index'][b['mask']] for b in batches])
  assert counts == [3] * hosts
  # Concatenating host slices batch by batch (what the replicated output does) restores order.
  gathered = np.concatenate([np.concatenate([seen[h][b] for h in range(hosts)])
                             for b in range(3)])
  np.testing.assert_array_equal(gathered, np.arange(num))


def test_pad_batch_keeps_incoming_mask_and_checks_rows():
  batch = pad_batch({'x': np.ones((3, 2)), 'mask': np.array([True, False, True])}, 5)
  np.testing.assert_array_equal(batch['mask'], [True, False, True, False, False])
  assert batch['x'].shape == (5, 2) and batch['x'][3:].sum() == 0
  with pytest.raises(ValueError, match="'y' has 2 rows, expected 3"):
    pad_batch({'x': np.ones(3), 'y': np.ones(2)}, 4)
  with pytest.raises(ValueError, match='larger than the batch size'):
    pad_batch({'x': np.ones(6)}, 4)


def _hash_tokenizer(context, vocab, eot):
  """Deterministic word-hash token ids (tests only): [sot, words..., eot, 0...]."""
  word_ids = {}

  def word_id(word):
    if word not in word_ids:
      word_ids[word] = 4 + (sum(map(ord, word)) * 31 + len(word)) % (vocab - 4)
    return word_ids[word]

  def tokenize(texts):
    out = np.zeros((len(texts), context), np.int32)
    for row, text in enumerate(texts):
      ids = ([2] + [word_id(w) for w in text.split()])[:context - 1] + [eot]
      out[row, :len(ids)] = ids
    return out
  tokenize.context_length = context
  return tokenize


def random_variables(cfg, seed):
  """Random weights of the right shapes without compiling an initialiser (tests only)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(leaf.dtype)
    return 1 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * noise

  return jax.tree_util.tree_map_with_path(fill, param_shapes(cfg))


def test_classifier_batches_1000_classes_x_80_templates_with_bounded_memory(mesh):
  # A smaller text tower than `tiny` keeps 80,000 prompts fast; same code path.
  cfg = model_config('tiny')
  cfg.text.update(width=32, heads=1, layers=1, context_length=8)
  model = ClipModel(cfg, random_variables(cfg, seed=0))
  tokenize = _hash_tokenizer(8, 512, eot=3)
  classnames = [f'thing{c} kind{c % 7}' for c in range(1000)]
  templates = [f'a style{t} photo of a {{}}.' for t in range(80)]
  batch_size = 2048
  largest = []
  encode = text_encoder(model.module, model.variables, mesh, batch_size)

  def recording_encode(tokens):
    largest.append(len(tokens))
    return encode(tokens)

  classifier = zeroshot_classifier(recording_encode, tokenize, classnames, templates, batch_size)
  assert classifier.shape == (1000, 64)
  assert max(largest) <= batch_size and sum(largest) == 80_000
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=-1), 1.0, atol=1e-5)
  # Reference, one class at a time as in the paper: normalise, average, renormalise.
  for c in (0, 25, 26, 999):     # 25 and 26: a class straddling two prompt batches
    prompts = [t.format(classnames[c]) for t in templates]
    want = _unit(_unit(encode(tokenize(prompts))).mean(axis=0))
    np.testing.assert_allclose(classifier[c], want, atol=2e-5)


def test_classifier_cache_is_keyed_by_model_classes_and_templates(tiny, mesh, tmp_path):
  tokenize = _hash_tokenizer(16, 512, eot=3)
  calls = []
  encode = text_encoder(tiny.module, tiny.variables, mesh, 16)

  def counting_encode(tokens):
    calls.append(len(tokens))
    return encode(tokens)

  fingerprint = params_fingerprint(tiny.variables)
  build = lambda names, templates, fp: zeroshot_classifier(
      counting_encode, tokenize, names, templates, 16, cache_dir=str(tmp_path), fingerprint=fp)
  first = build(['cat', 'dog'], ['a {}.', 'a photo of a {}.'], fingerprint)
  assert len(calls) == 1
  np.testing.assert_array_equal(build(['cat', 'dog'], ['a {}.', 'a photo of a {}.'], fingerprint),
                                first)
  assert len(calls) == 1                     # served from the cache
  build(['cat', 'dog'], ['a {}.'], fingerprint)
  build(['dog', 'cat'], ['a {}.', 'a photo of a {}.'], fingerprint)
  copy = jax.tree.map(np.array, tiny.variables)
  assert params_fingerprint(copy) == fingerprint
  copy['params']['text']['ln_final']['bias'][5] += 1e-3      # one weight of one layer
  other_fingerprint = params_fingerprint(copy)
  assert other_fingerprint != fingerprint
  build(['cat', 'dog'], ['a {}.', 'a photo of a {}.'], other_fingerprint)
  assert len(calls) == 4 and len(list(tmp_path.glob('zeroshot_*.npy'))) == 4
  with pytest.raises(ValueError, match='no class names'):
    zeroshot_classifier(counting_encode, tokenize, [], ['{}'], 4)
