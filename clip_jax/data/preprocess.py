"""Image preprocessing in tf: decode, crop, resize, CLIP normalisation.

Training crops are random but *stateless*: each sample's crop comes from a seed that is
a function of (config seed, epoch, file group, position), so a resumed stream crops
exactly as the uninterrupted one would have. For JPEG (nearly all web images) only the
crop window is decoded (`decode_and_crop_jpeg`), which is most of the pipeline's speed.

Crops:
  square          the paper's "random square crop": a square of side
                  sqrt(U(scale)) * shorter side at a uniform position, resized.
  random_resized  torchvision/open_clip RandomResizedCrop: area fraction U(scale),
                  aspect ratio log-uniform in `ratio` (whole image if no fit).
  center          shorter side resized to the output size, centre crop (evaluation).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

# OpenAI's CLIP pixel statistics (RGB, on [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROPS = ('square', 'random_resized', 'center')
RESIZE_METHODS = ('bicubic', 'bilinear', 'area', 'lanczos3', 'nearest')


def _decode_full(image_bytes: tf.Tensor) -> tf.Tensor:
  """Any supported format (JPEG, PNG, GIF first frame, BMP, WebP) -> uint8 [H, W, 3]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _square_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                   scale: Sequence[float]) -> tf.Tensor:
  """[top, left, side, side] of a random square of area fraction U(scale) of the largest one."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  fraction = tf.random.stateless_uniform([], seeds[0], float(scale[0]), float(scale[1]))
  shorter = tf.minimum(height, width)
  side = tf.cast(tf.round(tf.cast(shorter, tf.float32) * tf.sqrt(fraction)), tf.int32)
  side = tf.clip_by_value(side, 1, shorter)
  top = tf.random.stateless_uniform([], seeds[1], 0, height - side + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[2], 0, width - side + 1, tf.int32)
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
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), method=method,
                            antialias=method != 'nearest')
  return tf.clip_by_value(resized, 0.0, 255.0)


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
    return tf.io.decode_and_crop_jpeg(image_bytes, crop_window, channels=3)

  def other() -> tf.Tensor:
    image = _decode_full(image_bytes)
    top, left, height, width = tf.unstack(window(tf.shape(image)))
    return image[top:top + height, left:left + width]

  if crop not in ('square', 'random_resized'):
    raise ValueError(f'config.data.crop: unknown training crop {crop!r}; expected square or '
                     'random_resized')
  cropped = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  cropped.set_shape([None, None, 3])
  resized = _resize(cropped, image_size, image_size, method)
  resized.set_shape([image_size, image_size, 3])
  return resized


def decode_center_crop(image_bytes: tf.Tensor, image_size: int,
                       method: str = 'bicubic') -> tf.Tensor:
  """Encoded image -> float32 [image_size]^2 x 3 in [0, 255]: shorter side resized, centre crop.

  The arithmetic is torchvision's Resize(int) + CenterCrop (open_clip's eval transform).
  """
  image = _decode_full(image_bytes)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  new_height = tf.where(height <= width, image_size,
                        tf.cast(image_size * tf.cast(height, tf.float32) / shorter, tf.int32))
  new_width = tf.where(width < height, image_size,
                       tf.cast(image_size * tf.cast(width, tf.float32) / shorter, tf.int32))
  resized = _resize(image, new_height, new_width, method)
  top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float32) / 2.0), tf.int32)
  cropped = resized[top:top + image_size, left:left + image_size]
  cropped.set_shape([image_size, image_size, 3])
  return cropped


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] RGB -> CLIP-normalised float32."""
  return (tf.cast(image, tf.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
