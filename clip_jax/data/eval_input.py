"""The one evaluation input path: how an example becomes pixels, and which host reads it.

Every evaluation source (an image folder, the built-in scenes, TFDS, TFRecord shards,
wds tars) goes through the two rules below; no tensorflow here, so image folders need
only PIL.

Pixels: open_clip's eval transform (`image_transform(image_size, is_train=False)`): PIL
decodes to RGB, a bicubic resize brings the shorter side to `image_size` (the longer one
to int(image_size * long / short), as torchvision's Resize), a centred square crop at
offsets round((side - image_size) / 2), then CLIP's mean and std. PIL is the decoder
because open_clip's is: the same file gives the same pixels in both, from any source.

Hosts: the examples of a split are numbered 0..N-1 in the source's order. Global batch b
holds examples [b*G, (b+1)*G), and host p of P reads the p-th contiguous part of it
(G/P rows), padded with rows whose `mask` is False. So every host yields the same number
of batches (a collective program needs that), every example is read by exactly one host,
and rows gathered in process order come back in example order.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from clip_jax import storage
from clip_jax.models import architectures

# OpenAI's CLIP pixel statistics (RGB, on [0, 1]).
CLIP_MEAN = np.array(architectures.CLIP_MEAN, np.float32)
CLIP_STD = np.array(architectures.CLIP_STD, np.float32)
# What PIL raises for bytes that are not a readable image (UnidentifiedImageError is an
# OSError; truncated files raise OSError, bad headers ValueError).
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# The `label` of padding and of examples that could not be read: no class, so such a row
# can never be scored as one.
NO_LABEL = -1

LoadRows = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def normalize_pixels(uint8_images: np.ndarray) -> np.ndarray:
  """uint8 (or [0, 255] float) HWC images -> float32 with CLIP's mean and std."""
  return ((np.asarray(uint8_images, np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD


def resize_center_crop(image: Image.Image, image_size: int) -> Image.Image:
  """Bicubic resize of the shorter side to `image_size`, then a centred square crop
  (torchvision's Resize(int) + CenterCrop arithmetic, which open_clip's eval transform uses)."""
  image = image.convert('RGB')
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = image_size, int(image_size * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return image.crop((left, top, left + image_size, top + image_size))


def image_pixels(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
  """A PIL image or a uint8 HWC array as float32 [image_size, image_size, 3], CLIP-normalised."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return normalize_pixels(np.asarray(resize_center_crop(image, image_size)))


def decode_image(data: bytes, image_size: int) -> np.ndarray:
  """Encoded image bytes (any format PIL reads) as `image_pixels`."""
  with Image.open(io.BytesIO(data)) as image:
    return image_pixels(image, image_size)


def load_image(path: storage.PathLike, image_size: int) -> np.ndarray:
  """One image file (local or on a bucket) as `image_pixels`."""
  return decode_image(storage.read_bytes(path), image_size)


def decode_images(items: Sequence[Any], image_size: int,
                  read: Callable[[Any], bytes] | None = None
                  ) -> tuple[np.ndarray, list[str | None]]:
  """float32 [n, image_size, image_size, 3] of `read(item)` (the item itself when `read`
  is None) decoded, and per item why it could not be (None when it could).

  A None item is an example the source could not read. PIL decodes and resizes
  without the GIL: threads keep a host's cores busy.
  """
  images = np.zeros((len(items), image_size, image_size, 3), np.float32)
  problems: list[str | None] = [None] * len(items)

  def load(row: int) -> None:
    if items[row] is None:
      problems[row] = 'unreadable record'
      return
    try:
      data = read(items[row]) if read else items[row]
      images[row] = decode_image(data, image_size)
    except DECODE_ERRORS as error:   # a corrupt example is masked out and reported
      problems[row] = str(error) or type(error).__name__

  if items:
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
      list(pool.map(load, range(len(items))))
  return images, problems


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every array to `size` rows with zeros (`label` with NO_LABEL); `mask` marks the
  real rows."""
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f'pad_batch: batch of {n} rows is larger than the batch size {size}')
  mask = np.asarray(batch['mask'], bool) if 'mask' in batch else np.ones(n, bool)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if len(value) != n:
      raise ValueError(f'pad_batch: {key!r} has {len(value)} rows, expected {n}')
    padding = np.full((size - n,) + value.shape[1:], NO_LABEL if key == 'label' else 0,
                      value.dtype)
    out[key] = np.concatenate([value, padding])
  out['mask'] = np.concatenate([mask, np.zeros(size - n, bool)])
  return out


def host_ranges(num_examples: int, batch_size: int, process_index: int,
                process_count: int) -> list[range]:
  """The examples this host reads, one range per global batch (possibly empty); see the
  module docstring. `batch_size` is the host's share of a global batch."""
  if batch_size <= 0:
    raise ValueError(f'eval batch size per host: expected a positive number, got {batch_size}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  ranges = []
  for start in range(0, num_examples, batch_size * process_count):
    lo = min(start + process_index * batch_size, num_examples)
    ranges.append(range(lo, min(lo + batch_size, num_examples)))
  return ranges


def split_batches(num_examples: int, batch_size: int, load_rows: LoadRows, process_index: int,
                  process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This host's batches of `batch_size` rows over examples 0..num_examples-1, padded.

  `load_rows(indices)` returns the rows of examples `indices`, which ascend from call
  to call (a stream can be read forward); an empty `indices` (a host past the end in the
  last batch) asks for zero rows of the right shapes.
  """
  for rows in host_ranges(num_examples, batch_size, process_index, process_count):
    yield pad_batch(load_rows(np.arange(rows.start, rows.stop)), batch_size)
