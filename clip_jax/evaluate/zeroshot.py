"""Zero-shot classification: a classifier from class names x prompt templates.

Per class, every template is filled in, tokenized and encoded; the embeddings are
L2-normalised, averaged over the templates and renormalised (the prompt ensemble of
Radford et al. 2021). Images are then classified by cosine similarity.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import storage
from clip_jax.evaluate.templates import fill_template

# encode_text_fn(token ids [n, context]) -> L2-normalised features [n, E] (numpy).
EncodeTextFn = Callable[[np.ndarray], np.ndarray]
TokenizeFn = Callable[[Sequence[str]], np.ndarray]


@jax.jit
def _leaf_checksums(leaves: list[jax.Array]) -> jax.Array:
  """[num_leaves, 2]: plain and position-weighted sums (a permutation changes the second)."""
  out = []
  for leaf in leaves:
    x = jnp.ravel(leaf).astype(jnp.float32)
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32) * 0.618034)
    out.append(jnp.stack([jnp.sum(x), jnp.sum(x * weights)]))
  return jnp.stack(out) if out else jnp.zeros((0, 2))


def params_fingerprint(variables: Any) -> str:
  """A short hash of a model's variables, computed on device (sharded params stay put).

  Each leaf contributes its name, shape and two weighted sums; any change of the
  weights changes the fingerprint, without copying the model to the host. A different
  device layout may round the sums differently: that only costs a cache miss.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  digest = hashlib.sha256(str(treedef).encode())
  for (path, leaf) in leaves:
    digest.update(f'{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype};'.encode())
  values = np.asarray(jax.device_get(_leaf_checksums([leaf for _, leaf in leaves])))
  digest.update(values.astype(np.float32).tobytes())
  return digest.hexdigest()[:16]


def classifier_cache_key(fingerprint: str, classnames: Sequence[str],
                         templates: Sequence[str]) -> str:
  blob = json.dumps([fingerprint, list(classnames), list(templates)], ensure_ascii=False)
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def zeroshot_classifier(encode_text_fn: EncodeTextFn, tokenize_fn: TokenizeFn,
                        classnames: Sequence[str], templates: Sequence[str], batch_size: int,
                        *, cache_dir: str | None = None, fingerprint: str | None = None
                        ) -> np.ndarray:
  """Class embeddings [num_classes, E], unit norm, built `batch_size` prompts at a time.

  Memory stays bounded whatever the class and template counts: at most `batch_size`
  prompts are tokenized and encoded at once, and each class's templates are reduced
  to one vector as soon as they are encoded. With `cache_dir` and `fingerprint` (see
  `params_fingerprint`), the result is kept in `cache_dir` under a hash of the model,
  class names and templates, and reused.
  """
  classnames, templates = list(classnames), list(templates)
  if not classnames:
    raise ValueError('zeroshot_classifier: no class names')
  if not templates:
    raise ValueError('zeroshot_classifier: no templates')
  if batch_size <= 0:
    raise ValueError(f'zeroshot_classifier: batch_size must be positive, got {batch_size}')
  cache_path = None
  if cache_dir and fingerprint:
    key = classifier_cache_key(fingerprint, classnames, templates)
    cache_path = storage.join(cache_dir, f'zeroshot_{key}.npy')
    if cache_path.exists():
      return np.load(io.BytesIO(storage.read_bytes(cache_path)))

  num_templates = len(templates)
  # Class-major list of prompts; walked in slices of `batch_size`, so a class's templates
  # may straddle two slices: partial sums are accumulated per class.
  sums: np.ndarray | None = None
  total = len(classnames) * num_templates
  for start in range(0, total, batch_size):
    flat = np.arange(start, min(start + batch_size, total))
    class_ids, template_ids = flat // num_templates, flat % num_templates
    prompts = [fill_template(templates[t], classnames[c]) for c, t in zip(class_ids, template_ids)]
    features = np.asarray(encode_text_fn(tokenize_fn(prompts)), np.float32)
    if features.shape[0] != len(prompts):
      raise ValueError(f'zeroshot_classifier: encode_text_fn returned {features.shape[0]} rows '
                       f'for {len(prompts)} prompts')
    features = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    if sums is None:
      sums = np.zeros((len(classnames), features.shape[-1]), np.float64)
    # class_ids ascend (class-major order): sum each class's run of rows at once.
    starts = np.flatnonzero(np.r_[True, class_ids[1:] != class_ids[:-1]])
    sums[class_ids[starts]] += np.add.reduceat(features.astype(np.float64), starts, axis=0)
  classifier = (sums / num_templates).astype(np.float32)
  classifier /= np.maximum(np.linalg.norm(classifier, axis=-1, keepdims=True), 1e-12)

  if cache_path:
    buffer = io.BytesIO()
    np.save(buffer, classifier)
    storage.write_bytes(cache_path, buffer.getvalue())   # atomic: never half a file
  return classifier


def zeroshot_logits(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
  """Cosine similarities [N, num_classes] of L2-normalised image features and classes."""
  image_features = np.asarray(image_features, np.float32)
  image_features = image_features / np.maximum(
      np.linalg.norm(image_features, axis=-1, keepdims=True), 1e-12)
  return image_features @ np.asarray(classifier, np.float32).T


def topk_predictions(logits: np.ndarray, k: int) -> np.ndarray:
  """Indices [N, k] of the k best classes; ties go to the lower class index."""
  order = np.argsort(-logits, axis=-1, kind='stable')
  return order[:, :k]


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """top-k accuracy (percent) for each k, and the mean over classes of per-class recall.

  Classes absent from `labels` are left out of the per-class mean; k larger than the
  number of classes counts as the number of classes.
  """
  labels = np.asarray(labels)
  num_classes = logits.shape[-1]
  if labels.shape[0] != logits.shape[0]:
    raise ValueError(f'classification_metrics: {logits.shape[0]} predictions but '
                     f'{labels.shape[0]} labels')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'classification_metrics: labels must be in [0, {num_classes}), got '
                     f'[{labels.min()}, {labels.max()}]')
  top = topk_predictions(logits, min(max(ks), num_classes))
  metrics = {}
  for k in ks:
    hits = np.any(top[:, :min(k, num_classes)] == labels[:, None], axis=-1)
    metrics[f'top{k}'] = 100.0 * float(np.mean(hits))
  metrics['mean_per_class'] = mean_per_class_accuracy(top[:, 0] == labels, labels)
  return metrics


def mean_per_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present in `labels` of the fraction correct, in percent."""
  return 100.0 * float(np.mean([correct[labels == c].mean() for c in np.unique(labels)]))


def zeroshot_accuracy(image_features: np.ndarray, labels: np.ndarray, classifier: np.ndarray,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Zero-shot top-k and mean per-class accuracy (percent) of image features."""
  return classification_metrics(zeroshot_logits(image_features, classifier), labels, ks)
