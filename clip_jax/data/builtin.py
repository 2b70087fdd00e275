"""The built-in dataset: procedurally drawn scenes with captions, no download needed.

Each image is one shape (circle, square, ...) in one colour, of some size, at some
place, on a noisy tinted background; its captions describe it in varied words
("a small red circle on the left", "there is a red circle in the picture", ...).
Some (colour, shape) pairs never occur in training: the model sees red things
and circles, never a red circle. Classifying images of those held-out pairs with
prompts ("a photo of a red circle.") is zero-shot transfer to new compositions,
which is what makes the tiny default run say something about CLIP.

`prepare(...)` writes everything once under a directory: TFRecord shards of the
training scenes (read back by the ordinary tf.data pipeline) and a SentencePiece
tokenizer trained on the captions. Evaluation scenes are drawn on demand from the
seeds in EVAL_SEEDS, which training refuses, so no evaluation image is a training
image; clip_jax.evaluate.datasets names the evaluation sets built from them.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from clip_jax import storage

SHAPES = ('circle', 'square', 'triangle', 'cross', 'star', 'ring')
COLOURS = {
    'red': (220, 40, 40), 'green': (40, 190, 60), 'blue': (50, 90, 240),
    'yellow': (240, 220, 40), 'purple': (160, 60, 210), 'white': (240, 240, 240),
}
# Never drawn in training; one per shape and per colour, so every word is learnt.
HELD_OUT = (('red', 'circle'), ('green', 'square'), ('blue', 'triangle'),
            ('yellow', 'cross'), ('purple', 'star'), ('white', 'ring'))
SIZES = {'small': (0.16, 0.22), 'large': (0.28, 0.38)}   # radius as a fraction of the image
PLACES = ('top left', 'top', 'top right', 'left', 'middle', 'right',   # see _place
          'bottom left', 'bottom', 'bottom right')
# Caption templates; a few name only the colour or only the shape.
CAPTION_TEMPLATES = (
    'a {colour} {shape}',
    'a photo of a {colour} {shape}.',
    'a {size} {colour} {shape}',
    'a {colour} {shape} on the {place}',
    'a {size} {colour} {shape} on the {place}.',
    'there is a {colour} {shape} in the picture',
    'a picture of a {size} {shape}, {colour}',
    'a {shape} painted {colour}',
    'a drawing of a {colour} {shape} on a grey background',
    '{colour} {shape}',
    'the {shape} is {colour}',
    'a {colour} {shape} near the {place}',
    'something {colour} on the {place}',
    'a {size} {shape} on the {place}',
)
# Phrasings never used in training (no training template can produce these strings), built
# from training words only, so the tokenizer knows them. Each names colour, shape, size
# and place: within a set of distinct scenes (`retrieval_scenes`) a caption fits one image.
RETRIEVAL_TEMPLATES = (
    'the {size} {colour} {shape} is on the {place}',
    'on the {place} there is a {size} {colour} {shape}',
    'a picture of a {size} {colour} {shape} near the {place}',
    '{colour} {shape}, {size}, on the {place}',
)
# Prompts of the zero-shot classifier (ensembled, as in CLIP).
PROMPT_TEMPLATES = ('a photo of a {}.', 'a {}.', 'a drawing of a {}.', 'there is a {} in the picture')


def class_names() -> list[str]:
  """All (colour, shape) pairs, label = index; held-out pairs are among them."""
  return [f'{colour} {shape}' for shape in SHAPES for colour in COLOURS]


def label_of(colour: str, shape: str) -> int:
  return SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def _place(x: float, y: float) -> str:
  horizontal = 'left' if x < 0.4 else 'right' if x > 0.6 else ''
  vertical = 'top' if y < 0.4 else 'bottom' if y > 0.6 else ''
  return f'{vertical} {horizontal}'.strip() or 'middle'


def _polygon(cx: float, cy: float, r: float, points: Sequence[tuple[float, float]],
             angle: float) -> list[tuple[float, float]]:
  cos, sin = math.cos(angle), math.sin(angle)
  return [(cx + r * (px * cos - py * sin), cy + r * (px * sin + py * cos)) for px, py in points]


_STAR = [(math.cos(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45),
          -math.sin(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45))
         for k in range(10)]
_CROSS = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
          (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
_TRIANGLE = [(0, -1), (0.87, 0.5), (-0.87, 0.5)]
_SQUARE = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]


def draw_scene(colour: str, shape: str, size: str, rng: np.random.Generator,
               image_size: int = 32) -> tuple[np.ndarray, str]:
  """One scene as uint8 [image_size, image_size, 3] and the name of its place."""
  scale = 4   # drawn 4x larger and downsampled: smooth edges at 32 px
  canvas = image_size * scale
  background = rng.integers(25, 110) + rng.integers(-15, 16, size=3)
  image = Image.new('RGB', (canvas, canvas), tuple(int(c) for c in np.clip(background, 0, 255)))
  draw = ImageDraw.Draw(image)
  radius = rng.uniform(*SIZES[size])
  x, y = rng.uniform(radius, 1 - radius, size=2)
  fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, 3),
                                       0, 255))
  cx, cy, r = x * canvas, y * canvas, radius * canvas
  angle = rng.uniform(-0.35, 0.35)
  if shape == 'circle':
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == 'ring':
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
  else:
    points = {'square': _SQUARE, 'triangle': _TRIANGLE, 'cross': _CROSS, 'star': _STAR}[shape]
    draw.polygon(_polygon(cx, cy, r, points, angle), fill=fill)
  pixels = np.asarray(image.resize((image_size, image_size), Image.BOX), np.float32)
  pixels += rng.normal(0, 6, pixels.shape)
  return np.clip(pixels, 0, 255).astype(np.uint8), _place(x, y)


def caption(colour: str, shape: str, size: str, place: str, rng: np.random.Generator) -> str:
  template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
  return template.format(colour=colour, shape=shape, size=size, place=place)


def scenes(num: int, seed: int, held_out: bool, image_size: int = 32,
           captions_per_image: int = 3) -> Iterator[dict]:
  """Records {'image': uint8 HWC, 'caption': [str], 'label': int} of training or held-out pairs.

  Deterministic in `seed`; training scenes never show a held-out pair and held-out
  scenes show nothing else.
  """
  pairs = [(c, s) for s in SHAPES for c in COLOURS if ((c, s) in HELD_OUT) == held_out]
  rng = np.random.default_rng(seed)
  for _ in range(num):
    colour, shape = pairs[rng.integers(len(pairs))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    image, place = draw_scene(colour, shape, size, rng, image_size)
    captions = [caption(colour, shape, size, place, rng) for _ in range(captions_per_image)]
    yield {'image': image, 'caption': captions, 'label': label_of(colour, shape)}


def retrieval_scenes(num: int, seed: int, image_size: int = 32,
                     captions_per_image: int = 2) -> list[dict]:
  """`num` scenes of seen pairs, no two with the same (colour, shape, size, place), each
  captioned by `captions_per_image` different RETRIEVAL_TEMPLATES.

  Distinct descriptions make text->image Recall@1 reachable: a caption's words single out
  its image. At most 30 pairs x 2 sizes x 9 places = 540 scenes exist.
  """
  pairs = [(c, s) for s in SHAPES for c in COLOURS if (c, s) not in HELD_OUT]
  most = len(pairs) * len(SIZES) * len(PLACES)
  if not 0 < num <= most:
    raise ValueError(f'retrieval_scenes: num={num}; expected 1..{most} distinct scenes')
  if not 0 < captions_per_image <= len(RETRIEVAL_TEMPLATES):
    raise ValueError(f'retrieval_scenes: captions_per_image={captions_per_image}; expected '
                     f'1..{len(RETRIEVAL_TEMPLATES)}')
  rng = np.random.default_rng(seed)
  records, described = [], set()
  while len(records) < num:
    colour, shape = pairs[rng.integers(len(pairs))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    image, place = draw_scene(colour, shape, size, rng, image_size)
    if (colour, shape, size, place) in described:
      continue
    described.add((colour, shape, size, place))
    templates = rng.choice(len(RETRIEVAL_TEMPLATES), captions_per_image, replace=False)
    captions = [RETRIEVAL_TEMPLATES[t].format(colour=colour, shape=shape, size=size, place=place)
                for t in templates]
    records.append({'image': image, 'caption': captions, 'label': label_of(colour, shape)})
  return records


# Seeds of the evaluation scenes: probe fitting, held-out pairs, seen pairs, retrieval.
EVAL_SEEDS = {'probe': 1, 'held_out': 2, 'seen': 3, 'retrieval': 4}

# Bump when the drawing or captions change: prepared data of another version is redrawn.
VERSION = 1
MANIFEST = 'builtin.json'


def _png(image: np.ndarray) -> bytes:
  # Lossless: JPEG's chroma subsampling would smear 32-px shapes' colours.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def prepare(output_dir: storage.PathLike, *, num_train: int = 8000, seed: int = 0,
            image_size: int = 32, num_shards: int = 8, vocab_size: int = 512,
            captions_per_image: int = 3) -> dict[str, Any]:
  """Writes the training shards and a SentencePiece tokenizer under `output_dir` (once;
  local or a bucket).

  Returns the manifest: `pattern` (the shards), `tokenizer` (the .model path),
  `num_train`, ... A directory already holding data of the same settings is reused,
  so a resumed run reads exactly the files it started with.
  """
  if int(seed) in EVAL_SEEDS.values():
    raise ValueError(f'builtin: seed {seed} draws evaluation scenes '
                     f'({", ".join(f"{k}={v}" for k, v in EVAL_SEEDS.items())}); train on '
                     'another seed (config.builtin.seed) so no evaluation image is trained on')
  from clip_jax.data.shards import write_tfrecord_shards  # tensorflow, only when writing
  from clip_jax.data.tokenizers import train_sentencepiece
  settings = dict(version=VERSION, num_train=int(num_train), seed=int(seed),
                  image_size=int(image_size), num_shards=int(num_shards),
                  vocab_size=int(vocab_size), captions_per_image=int(captions_per_image))
  output_dir = storage.resolve(output_dir)
  manifest_path = output_dir / MANIFEST
  if manifest_path.exists():
    manifest = json.loads(storage.read_text(manifest_path))
    if ({k: manifest.get(k) for k in settings} == settings
        and all(storage.exists(p) for p in manifest['files'] + [manifest['tokenizer']])):
      return manifest
  captions: list[str] = []

  def records() -> Iterator[dict]:
    for record in scenes(num_train, seed, held_out=False, image_size=image_size,
                         captions_per_image=captions_per_image):
      captions.extend(record['caption'])
      yield dict(record, image=_png(record['image']))

  files = write_tfrecord_shards(records(), output_dir / 'shards', num_shards,
                                prefix='scenes')
  # The prompts are text the model must read too: the tokenizer learns their words.
  prompts = [t.format(name) for name in class_names() for t in PROMPT_TEMPLATES]
  # BPE: whole words of this small closed vocabulary become single pieces (unigram
  # would keep many words spelt out and overflow the 16-token context).
  tokenizer = train_sentencepiece(captions + prompts, output_dir / 'tokenizer', vocab_size,
                                  model_type='bpe')
  manifest = dict(settings, files=files, tokenizer=tokenizer,
                  pattern=str(output_dir / 'shards' / 'scenes-*.tfrecord'),
                  classes=class_names(), held_out=[f'{c} {s}' for c, s in HELD_OUT])
  # Written last (atomically): marks the data complete.
  storage.write_text(manifest_path, json.dumps(manifest, indent=2))
  return manifest
