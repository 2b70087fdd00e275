"""Image<->text retrieval Recall@K with several captions per image (COCO / Flickr style).

Ranking rule, used everywhere (and by the brute-force reference in the tests):
candidates are sorted by descending similarity, and equal similarities are ordered by
ascending candidate index. So a candidate j is ranked ahead of candidate c for a query
when s_j > s_c, or s_j == s_c and j < c; the rank of c is the number of such j.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ranks_of(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Rank (0 = first) of candidate targets[q] for each query row q of `scores`."""
  rows = np.arange(scores.shape[0])
  target_scores = scores[rows, targets][:, None]
  candidates = np.arange(scores.shape[1])[None, :]
  ahead = (scores > target_scores) | ((scores == target_scores) & (candidates < targets[:, None]))
  return ahead.sum(axis=1)


def retrieval_ranks(image_features: np.ndarray, text_features: np.ndarray,
                    text_to_image: np.ndarray, chunk: int = 1024
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Rank of the best matching caption per image, and of the matching image per caption.

  `text_to_image[t]` is the index of the image caption t describes; an image may have
  any number of captions (at least one). Features are L2-normalised here; queries are
  processed `chunk` at a time to bound memory.
  """
  images, texts = _normalize(image_features), _normalize(text_features)
  text_to_image = np.asarray(text_to_image, np.int64)
  num_images = images.shape[0]
  if text_to_image.shape != (texts.shape[0],):
    raise ValueError(f'retrieval: text_to_image has shape {text_to_image.shape}, expected '
                     f'({texts.shape[0]},), one image index per caption')
  if texts.shape[0] and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f'retrieval: text_to_image must index the {num_images} images')
  captions_per_image = np.bincount(text_to_image, minlength=num_images)
  if np.any(captions_per_image == 0):
    missing = np.flatnonzero(captions_per_image == 0)[:5].tolist()
    raise ValueError(f'retrieval: images {missing} have no caption')

  text_ranks = np.empty(texts.shape[0], np.int64)
  for start in range(0, texts.shape[0], chunk):
    stop = min(start + chunk, texts.shape[0])
    scores = texts[start:stop] @ images.T
    text_ranks[start:stop] = _ranks_of(scores, text_to_image[start:stop])

  image_ranks = np.empty(num_images, np.int64)
  owner = text_to_image[None, :]
  for start in range(0, num_images, chunk):
    stop = min(start + chunk, num_images)
    scores = images[start:stop] @ texts.T
    # The best caption of each image under the ranking rule: its highest score, and the
    # lowest index among equal scores. The image's rank is the rank of that caption.
    own = owner == np.arange(start, stop)[:, None]
    masked = np.where(own, scores, -np.inf)
    best = np.argmax(masked, axis=1)     # argmax returns the first (lowest) index on ties
    image_ranks[start:stop] = _ranks_of(scores, best)
  return image_ranks, text_ranks


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray,
                     text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                     ) -> dict[str, float]:
  """Recall@K in percent: `image_to_text_R{K}` and `text_to_image_R{K}` for each K (no
  '@': the same name is a legal TensorBoard tag).

  image->text: an image is a hit when any of its captions is among the K best texts;
  text->image: a caption is a hit when its image is among the K best images.
  """
  image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image)
  metrics = {}
  for k in ks:
    metrics[f'image_to_text_R{k}'] = 100.0 * float(np.mean(image_ranks < k))
  for k in ks:
    metrics[f'text_to_image_R{k}'] = 100.0 * float(np.mean(text_ranks < k))
  return metrics
