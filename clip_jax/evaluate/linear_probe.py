"""Linear probe: L-BFGS logistic regression on frozen image features (the paper's protocol).

Radford et al. (2021, appendix A.3) fit scikit-learn's L-BFGS logistic regression and
choose the inverse regularisation strength C on a validation split; we search C over a
log grid and then refine around the best value, both on a validation split carved from
the TRAIN features only, then refit on train+validation with the chosen C. Test labels
are used for the final score and nothing else.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from clip_jax.evaluate.zeroshot import mean_per_class_accuracy

# Coarse search: 1e-6 .. 1e6, one point per decade (the paper's starting range).
DEFAULT_CS = tuple(10.0 ** e for e in range(-6, 7))


def validation_split(labels: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Train/validation indices, stratified per class so small classes appear in both."""
  if not 0 < val_fraction < 1:
    raise ValueError(f'linear_probe: val_fraction must be in (0, 1), got {val_fraction}')
  rng = np.random.default_rng(seed)
  train_idx, val_idx = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_val = int(round(len(members) * val_fraction))
    if len(members) > 1:
      n_val = min(max(n_val, 1), len(members) - 1)
    else:
      n_val = 0
    val_idx.append(members[:n_val])
    train_idx.append(members[n_val:])
  return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int):
  from sklearn.linear_model import LogisticRegression   # scikit-learn is an eval-only dependency
  classifier = LogisticRegression(C=c, solver='lbfgs', max_iter=max_iter)
  with warnings.catch_warnings():
    # Very weak regularisation may stop at max_iter; the validation score judges it anyway.
    warnings.simplefilter('ignore')
    classifier.fit(features, labels)
  return classifier


def _accuracy(classifier, features: np.ndarray, labels: np.ndarray) -> float:
  return 100.0 * float(np.mean(classifier.predict(features) == labels))


def choose_c(train_features: np.ndarray, train_labels: np.ndarray, *,
             cs: Sequence[float] = DEFAULT_CS, refine_steps: int = 2, val_fraction: float = 0.2,
             seed: int = 0, max_iter: int = 1000) -> tuple[float, float]:
  """(best C, its validation accuracy) from the training set alone.

  After the coarse grid, each refinement step tries the geometric midpoints between the
  best C and its neighbours (halving the step in log space). Ties keep the smaller C,
  the stronger regularisation.
  """
  train_idx, val_idx = validation_split(np.asarray(train_labels), val_fraction, seed)
  if len(val_idx) == 0:
    raise ValueError('linear_probe: every class has a single training example; no validation '
                     'split can be carved out to choose C')
  x_tr, y_tr = train_features[train_idx], train_labels[train_idx]
  x_val, y_val = train_features[val_idx], train_labels[val_idx]
  scores: dict[float, float] = {}

  def score(c: float) -> float:
    if c not in scores:
      scores[c] = _accuracy(_fit(x_tr, y_tr, c, max_iter), x_val, y_val)
    return scores[c]

  def best() -> float:
    return min(scores, key=lambda c: (-scores[c], c))

  for c in sorted(cs):
    score(float(c))
  log_step = float(np.median(np.diff(np.log10(sorted(cs))))) if len(cs) > 1 else 1.0
  for _ in range(refine_steps):
    log_step /= 2
    center = best()
    for c in (center * 10 ** -log_step, center * 10 ** log_step):
      score(float(c))
  c = best()
  return c, scores[c]


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *,
                 cs: Sequence[float] = DEFAULT_CS, refine_steps: int = 2,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000
                 ) -> dict[str, float]:
  """Test accuracy (percent) of a logistic regression with C chosen on train data only.

  Returns `accuracy`, `mean_per_class`, the chosen `C` and its `val_accuracy`.
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if train_features.shape[0] != train_labels.shape[0]:
    raise ValueError(f'linear_probe: {train_features.shape[0]} train features but '
                     f'{train_labels.shape[0]} train labels')
  if test_features.shape[0] != test_labels.shape[0]:
    raise ValueError(f'linear_probe: {test_features.shape[0]} test features but '
                     f'{test_labels.shape[0]} test labels')
  if len(np.unique(train_labels)) < 2:
    raise ValueError('linear_probe: the training set needs at least two classes')
  c, val_accuracy = choose_c(train_features, train_labels, cs=cs, refine_steps=refine_steps,
                             val_fraction=val_fraction, seed=seed, max_iter=max_iter)
  classifier = _fit(train_features, train_labels, c, max_iter)    # refit on train+val
  predictions = classifier.predict(test_features)
  correct = predictions == test_labels
  return {'accuracy': 100.0 * float(np.mean(correct)),
          'mean_per_class': mean_per_class_accuracy(correct, test_labels),
          'C': float(c), 'val_accuracy': val_accuracy}
