"""Scoring on the host: Recall@K against brute force, the linear probe against scikit-learn,
zero-shot metrics, and the template sets."""

import warnings

import numpy as np
import pytest

from clip_jax.evaluate.linear_probe import choose_c, linear_probe, validation_split
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.templates import TEMPLATE_SETS, get_templates
from clip_jax.evaluate.zeroshot import classification_metrics, zeroshot_accuracy


def _tied_unit_vectors(rng, n, dim=8):
  """Rows with four entries of +-0.5: exactly unit norm, dot products exact multiples of 1/4,
  so many similarities tie exactly."""
  x = np.zeros((n, dim), np.float32)
  for row in x:
    row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
  return x


def _brute_force_recall(images, texts, owner, ks):
  """Reference: full stable sort per query (descending score, ties to the lower index)."""
  scores = images.astype(np.float64) @ texts.astype(np.float64).T
  out = {}
  i2t_ranks = []
  for i in range(len(images)):
    order = np.argsort(-scores[i], kind='stable')
    i2t_ranks.append(next(pos for pos, t in enumerate(order) if owner[t] == i))
  t2i_ranks = []
  for t in range(len(texts)):
    order = np.argsort(-scores[:, t], kind='stable')
    t2i_ranks.append(int(np.flatnonzero(order == owner[t])[0]))
  for k in ks:
    out[f'image_to_text_R{k}'] = 100.0 * np.mean(np.array(i2t_ranks) < k)
  for k in ks:
    out[f'text_to_image_R{k}'] = 100.0 * np.mean(np.array(t2i_ranks) < k)
  return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_recall_matches_brute_force_with_ties_and_several_captions(seed):
  rng = np.random.default_rng(seed)
  num_images = 40
  images = _tied_unit_vectors(rng, num_images)
  images[5] = images[3]                      # duplicate images: exact ties on the image side
  captions_per_image = rng.integers(1, 6, num_images)     # 1..5 captions each
  owner = np.repeat(np.arange(num_images), captions_per_image)
  owner = owner[rng.permutation(len(owner))]               # captions in no particular order
  texts = _tied_unit_vectors(rng, len(owner))
  texts[7] = texts[2]
  scores = images @ texts.T
  assert len(np.unique(scores)) < scores.size / 10        # the data really is full of ties
  ks = (1, 5, 10)
  got = retrieval_recall(images, texts, owner, ks)
  want = _brute_force_recall(images, texts, owner, ks)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-9), key
  # Scaling features changes nothing: they are normalised first.
  assert retrieval_recall(3 * images, 0.5 * texts, owner, ks) == got


def test_recall_tie_breaking_is_by_lower_index():
  images = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)   # identical images
  texts = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)    # identical captions
  owner = np.array([1, 0])            # text 0 describes image 1, text 1 describes image 0
  got = retrieval_recall(images, texts, owner, ks=(1,))
  # text 0 -> image 1 loses the tie to image 0; text 1 -> image 0 wins it.
  assert got['text_to_image_R1'] == 50.0
  # image 0's caption is text 1, behind text 0; image 1's caption text 0 is first.
  assert got['image_to_text_R1'] == 50.0


def test_recall_rejects_bad_caption_maps():
  images = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match=r'images \[2\] have no caption'):
    retrieval_recall(images, np.eye(3, dtype=np.float32)[:2], np.array([0, 1]))
  with pytest.raises(ValueError, match='one image index per caption'):
    retrieval_recall(images, np.eye(3, dtype=np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match='must index the 3 images'):
    retrieval_recall(images, np.eye(3, dtype=np.float32), np.array([0, 1, 3]))


def _blobs(rng, n, centers, noise):
  labels = rng.integers(0, len(centers), n)
  features = centers[labels] + noise * rng.normal(size=(n, centers.shape[1]))
  return features.astype(np.float32), labels


@pytest.fixture(scope='module')
def probe_data():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(5, 16))
  x_train, y_train = _blobs(rng, 1000, centers, 1.2)
  x_test, y_test = _blobs(rng, 2000, centers, 1.2)
  return x_train, y_train, x_test, y_test


def test_linear_probe_matches_sklearn_cross_validation(probe_data):
  from sklearn.linear_model import LogisticRegressionCV
  x_train, y_train, x_test, y_test = probe_data
  cs = tuple(10.0 ** e for e in range(-4, 4))
  ours = linear_probe(x_train, y_train, x_test, y_test, cs=cs)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)   # sklearn's announced default changes
    reference = LogisticRegressionCV(Cs=list(cs), cv=3, max_iter=1000).fit(x_train, y_train)
  ref_accuracy = 100.0 * np.mean(reference.predict(x_test) == y_test)
  assert 80 < ref_accuracy < 99           # neither trivial nor hopeless
  assert abs(ours['accuracy'] - ref_accuracy) <= 0.5
  assert ours['C'] > 0 and 0 <= ours['val_accuracy'] <= 100
  # The refit uses all training data with the chosen C: sklearn gives the same predictions.
  from sklearn.linear_model import LogisticRegression
  refit = LogisticRegression(C=ours['C'], max_iter=1000).fit(x_train, y_train)
  assert ours['accuracy'] == pytest.approx(100.0 * np.mean(refit.predict(x_test) == y_test))


def test_linear_probe_never_sees_test_labels(probe_data):
  x_train, y_train, x_test, y_test = probe_data
  cs = (1e-3, 1e-1, 10.0)
  honest = linear_probe(x_train, y_train, x_test, y_test, cs=cs, refine_steps=1)
  shuffled = np.random.default_rng(1).permutation(y_test)
  blind = linear_probe(x_train, y_train, x_test, shuffled, cs=cs, refine_steps=1)
  assert blind['C'] == honest['C'] and blind['val_accuracy'] == honest['val_accuracy']
  assert blind['accuracy'] < honest['accuracy'] - 30   # the shuffled labels were scored...
  # ...but only scored: the choice of C is a function of the training set alone.
  assert choose_c(x_train, y_train, cs=cs, refine_steps=1) == (honest['C'],
                                                                 honest['val_accuracy'])


def test_validation_split_is_stratified_and_disjoint():
  labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
  train, val = validation_split(labels, 0.2, seed=0)
  assert not set(train) & set(val) and len(train) + len(val) == len(labels)
  assert sorted(np.unique(labels[val])) == [0, 1, 2]
  assert sorted(np.unique(labels[train])) == [0, 1, 2]
  with pytest.raises(ValueError, match='val_fraction'):
    validation_split(labels, 1.5, seed=0)
  with pytest.raises(ValueError, match='at least two classes'):
    linear_probe(np.zeros((4, 2)), np.zeros(4), np.zeros((2, 2)), np.zeros(2))


def test_classification_metrics_topk_ties_and_per_class():
  logits = np.array([[0.9, 0.1, 0.0],
                     [0.5, 0.5, 0.0],     # tie: the lower class (0) wins top-1
                     [0.1, 0.2, 0.7],
                     [0.6, 0.3, 0.1]], np.float32)
  labels = np.array([0, 1, 2, 2])
  m = classification_metrics(logits, labels, ks=(1, 2, 5))
  assert m['top1'] == 50.0            # rows 0 and 2
  assert m['top2'] == 75.0            # row 1 is second
  assert m['top5'] == 100.0           # k beyond the class count: every class
  # per class: class 0 1/1, class 1 0/1, class 2 1/2 -> mean 50%
  assert m['mean_per_class'] == pytest.approx(50.0)
  with pytest.raises(ValueError, match=r'labels must be in \[0, 3\)'):
    classification_metrics(logits, np.array([0, 1, 2, 3]))


def test_zeroshot_accuracy_normalises_image_features():
  classifier = np.eye(3, dtype=np.float32)
  feats = np.array([[5.0, 1.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 9.0]], np.float32)
  assert zeroshot_accuracy(feats, np.array([0, 1, 2]), classifier)['top1'] == 100.0


def test_template_sets_and_files(tmp_path):
  assert len(TEMPLATE_SETS['imagenet']) == 80 and len(set(TEMPLATE_SETS['imagenet'])) == 80
  for name, templates in TEMPLATE_SETS.items():
    assert all(t.count('{}') == 1 for t in templates), name
  assert get_templates('auto', 'cifar100') == TEMPLATE_SETS['cifar100']
  assert get_templates('auto', 'imagenet2012') == TEMPLATE_SETS['imagenet']
  assert get_templates('auto', 'mnist') == TEMPLATE_SETS['digits']
  assert get_templates('auto', 'oxford_iiit_pet') == TEMPLATE_SETS['pets']
  assert get_templates('auto', 'my_photos') == TEMPLATE_SETS['generic']
  assert 'a photo of the number: "{}".' in TEMPLATE_SETS['digits']
  path = tmp_path / 'prompts.txt'
  path.write_text('# my prompts\na sketch of a {}.\n\nan icon of a {}.\n')
  assert get_templates(str(path)) == ('a sketch of a {}.', 'an icon of a {}.')
  path.write_text('a sketch of a {}.\nno placeholder here\n')
  with pytest.raises(ValueError, match='prompts.txt.*no placeholder here.*exactly one'):
    get_templates(str(path))
  with pytest.raises(ValueError, match='neither a template set'):
    get_templates('no-such-set')


def test_eval_config_section_is_validated(tmp_path):
  from clip_jax.config import get_config, validate
  config = get_config('tiny')
  validate(config)
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a {}.\n')
  config.eval.templates = str(prompts)
  validate(config)
  for key, value, message in (('templates', 'nope', 'config.eval.templates'),
                              ('batch_size', 0, r'config.eval.batch_size: expected an integer'),
                              ('every_steps', -1, 'config.eval.every_steps'),
                              ('probe_val_fraction', 1.0, 'config.eval.probe_val_fraction')):
    bad = get_config('tiny')
    bad.eval[key] = value
    with pytest.raises(ValueError, match=message):
      validate(bad)
