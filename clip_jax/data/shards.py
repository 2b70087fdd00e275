"""Writing image-text pairs as TFRecord shards the pipeline reads (feature keys: see sources).

A record is a dict: `image` (encoded bytes, written as given, or a uint8 HWC array,
encoded as JPEG), `caption` (a str or a list of str), optional `label` (int) and
optional `key` (str, e.g. the source path). Records go round-robin to `num_shards`
files `<prefix>-00000-of-00008.tfrecord`, ... so the shards have equal sizes (+-1).
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Mapping

import numpy as np
import tensorflow as tf
from PIL import Image

from clip_jax import storage
from clip_jax.data.tfrecord import ShardWriter


def shard_paths(output_dir: storage.PathLike, num_shards: int, prefix: str = 'shard'
                ) -> list[str]:
  """`<output_dir>/<prefix>-00000-of-00008.tfrecord`, ... (absolute, or URLs)."""
  return [str(storage.join(output_dir, f'{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord'))
          for i in range(num_shards)]


def resize_shorter_side(image: Image.Image, image_size: int) -> Image.Image:
  """Downscales (never upscales) so the shorter side is `image_size`, bicubic."""
  width, height = image.size
  shorter = min(width, height)
  if shorter <= image_size:
    return image
  new_size = (max(1, round(width * image_size / shorter)), max(1, round(height * image_size / shorter)))
  return image.resize(new_size, Image.BICUBIC)


def encode_image(image: Any, image_size: int | None = None, quality: int = 95) -> bytes:
  """Encoded bytes for a record's image: bytes pass through unless `image_size` asks for a
  resize; arrays (uint8 [H, W, 3] or [H, W]) are encoded as JPEG."""
  if isinstance(image, (bytes, bytearray)) and not image_size:
    return bytes(image)
  if isinstance(image, (bytes, bytearray)):
    picture = Image.open(io.BytesIO(image))
    picture.load()
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
      raise ValueError(f'image: expected encoded bytes or a uint8 [H, W, 3] array, got '
                       f'{array.dtype} {array.shape}')
    picture = Image.fromarray(array)
  picture = picture.convert('RGB')
  if image_size:
    picture = resize_shorter_side(picture, image_size)
  buffer = io.BytesIO()
  picture.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _bytes_feature(values: list[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def make_example(record: Mapping[str, Any], index: int = 0, image_size: int | None = None,
                 quality: int = 95) -> bytes:
  """One serialized tf.train.Example from a record (errors name the record's index)."""
  if 'image' not in record:
    raise ValueError(f'record {index}: missing "image" (encoded bytes or a uint8 array)')
  if 'caption' not in record:
    raise ValueError(f'record {index}: missing "caption" (a str or a list of str)')
  captions = record['caption']
  captions = [captions] if isinstance(captions, str) else list(captions)
  if not all(isinstance(c, str) for c in captions):
    raise ValueError(f'record {index}: "caption" must be a str or a list of str, got '
                     f'{type(record["caption"]).__name__}')
  try:
    image = encode_image(record['image'], image_size, quality)
  except (OSError, ValueError) as error:
    raise ValueError(f'record {index}: image: {error}') from error
  features = {'image': _bytes_feature([image]),
              'caption': _bytes_feature([c.encode('utf-8') for c in captions])}
  if record.get('label') is not None:
    features['label'] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record['label'])]))
  if record.get('key') is not None:
    features['key'] = _bytes_feature([str(record['key']).encode('utf-8')])
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_tfrecord_shards(records: Iterable[Mapping[str, Any]], output_dir: storage.PathLike,
                          num_shards: int, *, prefix: str = 'shard', image_size: int | None = None,
                          quality: int = 95) -> list[str]:
  """Writes `records` round-robin into `num_shards` TFRecord files; returns their paths.

  `output_dir` is local or a bucket; each shard appears whole or not at all (a failure
  half-way leaves none of the shards). `image_size` downscales every image so its
  shorter side is at most that (re-encoded as JPEG); without it, encoded images are
  stored byte for byte.
  """
  if num_shards < 1:
    raise ValueError(f'num_shards: expected >= 1, got {num_shards}')
  paths = shard_paths(output_dir, num_shards, prefix)
  writers: list[ShardWriter] = []
  error: BaseException | None = None
  try:
    writers = [ShardWriter(path) for path in paths]
    for index, record in enumerate(records):
      writers[index % num_shards].write(make_example(record, index, image_size, quality))
  except BaseException as failure:
    error = failure
    raise
  finally:
    for writer in writers:
      writer.close(error)
  return paths
