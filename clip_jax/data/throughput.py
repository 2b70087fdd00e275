r"""Input pipeline throughput: decode + crop + normalise + tokenize, per CPU core.

  python -m clip_jax.data.throughput                   # makes its own JPEG shards in a temp dir
  python -m clip_jax.data.throughput --pattern 'gs://bucket/shards/{00000..00009}.tar' --source wds

With no `--pattern` it draws `--num_images` real photo-like JPEGs (shapes, blur, texture
noise; quality 90) with captions of 5-25 words into TFRecord shards, sized as
img2dataset writes them for 224 px training (`--image_size 256 --resize_mode
keep_ratio`: shorter side 256, aspect ratio up to 4:3; `--min_side/--max_side` choose
other shorter sides, e.g. 320-640 for raw web images), then runs the training stream (random square crop,
bicubic resize to --image_size, CLIP normalisation, CLIP BPE tokenization, batching)
on --threads cores and prints `N images/s per core`: images per CPU-second the process
used (all its threads), so a busy shared machine does not understate it; the wall-clock
rate is printed too. It also prints the tokenizer's speed alone on one core. (The train
step on the accelerators is timed by `python -m clip_jax.benchmark`.)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clip_jax import storage

_WORDS = ('a photo of the small large red blue green dog cat man woman child car street house '
          'tree sky water beach mountain city night sunset old new wooden table with on in at '
          'near and black white vintage poster illustration closeup portrait view of from '
          'beautiful modern kitchen garden flowers bird river bridge 2019 3d logo design').split()


def make_photo(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A JPEG with photo-like statistics: smooth shapes, texture noise, slight blur."""
  base = Image.new('RGB', (width, height), tuple(int(c) for c in rng.integers(0, 255, 3)))
  draw = ImageDraw.Draw(base)
  for _ in range(12):
    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
    r = int(rng.integers(10, max(11, min(width, height) // 2)))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
  noise = rng.normal(0, 18, (height, width, 3))
  pixels = np.clip(np.asarray(base.filter(ImageFilter.GaussianBlur(2)), np.float32) + noise, 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def make_caption(rng: np.random.Generator) -> str:
  return ' '.join(rng.choice(_WORDS, size=int(rng.integers(5, 26)))).capitalize() + '.'


def random_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
  """(width, height): shorter side in [min_side, max_side], aspect ratio in [1, 4/3]."""
  shorter = int(rng.integers(min_side, max_side + 1))
  longer = int(shorter * rng.uniform(1.0, 4 / 3))
  return (shorter, longer) if rng.random() < 0.5 else (longer, shorter)


def write_photo_shards(folder: str, num_images: int, min_side: int, max_side: int,
                           num_shards: int = 8) -> str:
  """Real JPEG shards to read; returns their glob pattern."""
  from clip_jax.data.shards import write_tfrecord_shards  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  records = (dict(image=make_photo(rng, *random_size(rng, min_side, max_side)),
                  caption=make_caption(rng)) for _ in range(num_images))
  write_tfrecord_shards(records, folder, num_shards)
  return str(storage.join(folder, '*.tfrecord'))


def glob_size(pattern: str) -> int:
  return sum(storage.size(p) for p in storage.glob(pattern))


def tokenizer_speed(tokenizer, num_captions: int = 50_000) -> float:
  """Captions/s of the tokenizer on one core, over captions of a realistic vocabulary
  (after one warm-up pass, as in a long run where the word cache is warm)."""
  rng = np.random.default_rng(1)
  captions = [make_caption(rng) for _ in range(num_captions)]
  tokenizer(captions[:1000])
  start = time.perf_counter()
  for i in range(0, num_captions, 1000):
    tokenizer(captions[i:i + 1000])
  return num_captions / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.data.throughput',
                                   description=__doc__.split('\n\n')[0].strip())
  parser.add_argument('--pattern', default='', help='existing shards (default: make them)')
  parser.add_argument('--source', default='tfrecord', choices=('tfrecord', 'wds'),
                      help='data kind of --pattern, as config.data.train.source')
  parser.add_argument('--num_images', type=int, default=768)
  parser.add_argument('--min_side', type=int, default=256, help='shorter side of the images')
  parser.add_argument('--max_side', type=int, default=256)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_batches', type=int, default=30, help='timed batches')
  parser.add_argument('--threads', type=int, default=0, help='cores for tf.data (0: all)')
  parser.add_argument('--crop', default='square', choices=('square', 'random_resized'))
  parser.add_argument('--resize_method', default='bicubic')
  args = parser.parse_args(argv)

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from clip_jax.data.pipeline import train_dataset  # pylint: disable=import-outside-toplevel
  from clip_jax.data.sources import Source, StreamControl  # pylint: disable=import-outside-toplevel
  from clip_jax.data.tokenizers import ClipBpeTokenizer  # pylint: disable=import-outside-toplevel
  cores = args.threads or len(os.sched_getaffinity(0))
  tokenizer = ClipBpeTokenizer()
  with tempfile.TemporaryDirectory() as folder:
    pattern = args.pattern
    if not pattern:
      start = time.perf_counter()
      pattern = write_photo_shards(folder, args.num_images, args.min_side, args.max_side)
      size = glob_size(pattern)
      print(f'wrote {args.num_images} JPEGs (shorter side {args.min_side}-{args.max_side} px, '
            f'{size / args.num_images / 1024:.0f} KiB each on average) to {folder} in '
            f'{time.perf_counter() - start:.0f} s')
    source = Source(kind=args.source, pattern=pattern, name='--pattern')
    control = StreamControl()
    dataset = train_dataset(source, batch_size=args.batch_size, image_size=args.image_size,
                            tokenizer=tokenizer, crop=args.crop, resize_method=args.resize_method,
                            shuffle_buffer=1000, cycle_length=8, control=control)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    batches = control.iterate(dataset.with_options(options))
    for _ in range(3):                                   # warm-up: tracing, buffers
      next(batches)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.num_batches):
      batch = next(batches)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    control.finish()                                     # stop the readers before the cleanup
  images = args.num_batches * args.batch_size
  print(f'decode + {args.crop} crop + {args.resize_method} resize to {args.image_size} + '
        f'normalise + tokenize: {images / seconds:.0f} images/s on {cores} core(s) (wall '
        f'clock), {cpu_seconds:.1f} CPU-seconds for {images} images, image batch '
        f'{batch["image"].shape} {batch["image"].dtype}')
  # Per core = per CPU-second this process used: the figure does not depend on how many
  # cores are free (the machine may be shared), only on the work each image costs.
  print(f'{images / cpu_seconds:.0f} images/s per core')
  print(f'tokenizer (CLIP BPE, one core): {tokenizer_speed(tokenizer):.0f} captions/s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
