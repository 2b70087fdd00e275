"""Training image preprocessing in tf: decode, random crop, resize, CLIP normalisation.

Training crops are random but *stateless*: each sample's crop comes from a seed that is
a function of (config seed, epoch, file group, position), so a resumed stream crops
exactly as the uninterrupted one would have. For JPEG (nearly all web images) only the
crop window is decoded (`decode_and_crop_jpeg`), which is most of the pipeline's speed.
The window does not depend on the output size: a reduced-resolution stage
(config.train.stages, CLIPA) resizes the same crop to fewer pixels, the reduction CLIPA
found best (rather than cropping a smaller part).

Crops:
  square          the paper's "random square crop": a square of side
                  sqrt(U(scale)) * shorter side at a uniform position, resized.
  random_resized  torchvision/open_clip RandomResizedCrop: area fraction U(scale),
                  aspect ratio log-uniform in `ratio` (whole image if no fit).
Evaluation images take open_clip's eval transform instead, in PIL, from every source
(`clip_jax.data.eval_input`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

# OpenAI's CLIP pixel statistics (RGB, on [0, 1]), kept once with the architectures.
from clip_jax.models.architectures import CLIP_MEAN, CLIP_STD
TRAIN_CROPS = ('square', 'random_resized')   # config.data.crop
RESIZE_METHODS = ('bicubic', 'bilinear', 'area', 'lanczos3', 'nearest')


def _decode_full(image_bytes: tf.Tensor) -> tf.Tensor:
  """Any supported format (JPEG, PNG, GIF first frame, BMP, WebP) -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _square_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                   scale: Sequence[float]) -> tf.Tensor:
  """[top, left, side, side] of a random square of area fraction U(scale) of the largest one."""
  uniforms = tf.random.stateless_uniform([3], seed)     # one draw: area, top, left
  fraction = scale[0] + (scale[1] - scale[0]) * uniforms[0]
  shorter = tf.minimum(height, width)
  side = tf.cast(tf.round(tf.cast(shorter, tf.float32) * tf.sqrt(fraction)), tf.int32)
  side = tf.clip_by_value(side, 1, shorter)
  slack = tf.cast(tf.stack([height - side + 1, width - side + 1]), tf.float32)
  top, left = tf.unstack(tf.minimum(tf.cast(uniforms[1:] * slack, tf.int32),
                                    tf.cast(slack, tf.int32) - 1))
  return tf.stack([top, left, side, side])


def _random_resized_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                           scale: Sequence[float], ratio: Sequence[float]) -> tf.Tensor:
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]), tf.zeros([1, 0, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _resize(image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor,
            method: str) -> tf.Tensor:
  """Resize to float32 [height, width, 3] in [0, 255].

  Antialiasing widens the kernel by the downscale factor and costs 2-4x more: it is used
  only when shrinking by more than 2x (below that the plain kernel's taps already cover
  the input pixels).
  """
  size = tf.stack([height, width])    # (uint8 in, float32 out: no extra pass for a cast)
  if method == 'nearest':
    return tf.cast(tf.image.resize(image, size, method=method), tf.float32)
  shrink = tf.reduce_min(tf.cast(tf.shape(image)[:2], tf.float32) / tf.cast(size, tf.float32))
  resized = tf.cond(shrink > 2.0,
                    lambda: tf.image.resize(image, size, method=method, antialias=True),
                    lambda: tf.image.resize(image, size, method=method, antialias=False))
  return tf.clip_by_value(resized, 0.0, 255.0)


_JPEG_RATIOS = (1, 2, 4, 8)


def _decode_and_crop_jpeg_scaled(image_bytes: tf.Tensor, crop_window: tf.Tensor,
                                 image_size: int) -> tf.Tensor:
  """Decodes only the crop window, downscaled in the DCT domain by the largest of
  1/2/4/8 that keeps its shorter side >= image_size (libjpeg's scaled IDCT: a box-like
  filter, several times cheaper than a full decode followed by an antialiased resize)."""
  shorter = tf.minimum(crop_window[2], crop_window[3])
  index = tf.reduce_sum(tf.cast(
      tf.stack([shorter // r >= image_size for r in _JPEG_RATIOS[1:]]), tf.int32))

  def branch(ratio: int) -> Callable[[], tf.Tensor]:
    # With a ratio, decode_and_crop_jpeg reads the window in downscaled pixels.
    return lambda: tf.io.decode_and_crop_jpeg(image_bytes, crop_window // ratio, channels=3,
                                              ratio=ratio)

  return tf.switch_case(index, [branch(r) for r in _JPEG_RATIOS])


def decode_random_crop(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int, *,
                       crop: str = 'square', scale: Sequence[float] = (0.9, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3),
                       method: str = 'bicubic') -> tf.Tensor:
  """Encoded image -> float32 [image_size, image_size, 3] in [0, 255], randomly cropped.

  `seed` is an int32/int64 [2] stateless seed. Corrupt bytes raise (the caller skips
  and counts them).
  """
  def window(shape: tf.Tensor) -> tf.Tensor:
    if crop == 'square':
      return _square_window(shape[0], shape[1], seed, scale)
    return _random_resized_window(shape[0], shape[1], seed, scale, ratio)

  def jpeg() -> tf.Tensor:
    crop_window = window(tf.io.extract_jpeg_shape(image_bytes))
    return _decode_and_crop_jpeg_scaled(image_bytes, crop_window, image_size)

  def other() -> tf.Tensor:
    image = _decode_full(image_bytes)
    top, left, height, width = tf.unstack(window(tf.shape(image)))
    return image[top:top + height, left:left + width]

  if crop not in TRAIN_CROPS:
    raise ValueError(f'config.data.crop: unknown training crop {crop!r}; expected one of '
                     f'{", ".join(TRAIN_CROPS)}')
  cropped = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  cropped.set_shape([None, None, 3])
  resized = _resize(cropped, image_size, image_size, method)
  resized.set_shape([image_size, image_size, 3])
  return resized


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] RGB [H, W, 3] -> CLIP-normalised float32, (x / 255 - mean) / std.

  The per-channel constants are tiled to a [W, 3] row when W is static: broadcasting
  a [3] vector is several times slower in Eigen than broadcasting rows.
  """
  scale = np.array([1.0 / (255.0 * s) for s in CLIP_STD], np.float32)
  shift = np.array([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], np.float32)
  width = image.shape[-2]
  if width is not None:
    scale, shift = np.tile(scale, (width, 1)), np.tile(shift, (width, 1))
  return tf.cast(image, tf.float32) * scale - shift
