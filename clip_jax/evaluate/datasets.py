"""Evaluation datasets: an image folder (PIL, no tensorflow), the built-in scenes, and
TFDS or our TFRecord shards through the data pipeline (tensorflow, imported lazily).

A dataset spec is a string:
  folder:PATH   (or just PATH of a directory) images in `PATH/<class_name>/*.jpg`; an
                optional `PATH/captions.jsonl` with {"image": "<relative path>",
                "captions": [...]} per line makes it a retrieval set
  builtin       drawn scenes of `clip_jax.data.builtin` at seeds training never uses:
                split `test` shows only the six held-out colour/shape pairs (zero-shot
                transfer to new compositions), `train` only seen pairs (to fit a probe);
                the classes are all 36 pairs
  builtin_seen  new images of the 30 seen (trained) pairs, classified among all 36: what
                training bought on pairs it saw (`train` as for builtin)
  builtin_captions  retrieval (`test` only): new images of seen pairs, no two alike in
                colour, shape, size and place, captioned only in phrasings training never
                used (builtin.RETRIEVAL_TEMPLATES, made of training's words), so each
                caption fits one image and Recall@1 can reach 100%
                (sizes and seeds of the three: BUILTIN_SETS)
  tfds:NAME     a TFDS dataset already under `data_dir` (nothing is downloaded); class
                names from its `label` feature
  shards:GLOB   TFRecord shards written by `clip_jax.data.write_tfrecord_shards`; `{split}`
                in GLOB is replaced by the split (e.g. shards:/data/pets-{split}-*.tfrecord);
                class names (label order, one per line) from `classnames.txt` beside them

TFDS and shards are read by the data pipeline's eval iterator (tf.data on each host,
the host's share of the examples, padded to equal batch counts). Their retrieval uses
the first caption of each example, which the iterator tokenizes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import posixpath
from typing import Callable, Iterator, Sequence

import numpy as np
from jax.sharding import Mesh
from PIL import Image

from clip_jax import storage
from clip_jax.data import builtin
from clip_jax.evaluate.features import host_batch_size, host_batches
from clip_jax.models import architectures

# OpenAI's CLIP pixel statistics (RGB, on [0, 1]).
CLIP_MEAN = np.array(architectures.CLIP_MEAN, np.float32)
CLIP_STD = np.array(architectures.CLIP_STD, np.float32)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
CLASSNAMES_FILE = 'classnames.txt'


@dataclasses.dataclass(frozen=True)
class BuiltinSet:
  """A built-in evaluation set (drawn on demand, nothing stored); see the module docstring."""
  splits: dict[str, tuple[bool, int]]   # split -> (held-out pairs?, seed)
  size: int                             # scenes per split (config.eval.max_examples overrides)
  summary: str                          # what the trainer's summary calls its `test` split
  distinct: bool = False                # builtin.retrieval_scenes: distinct, new phrasings


_SEEDS = builtin.EVAL_SEEDS
_PROBE = (False, _SEEDS['probe'])
BUILTIN_SETS = {
    'builtin': BuiltinSet({'test': (True, _SEEDS['held_out']), 'train': _PROBE}, 600, 'held-out'),
    'builtin_seen': BuiltinSet({'test': (False, _SEEDS['seen']), 'train': _PROBE}, 600,
                               'seen pairs, new images'),
    'builtin_captions': BuiltinSet({'test': (False, _SEEDS['retrieval'])}, 200,
                                   'held-out captions', distinct=True),
}
BUILTIN_SPLITS = BUILTIN_SETS['builtin'].splits   # the notebook redraws these pictures


def builtin_name(spec: str, split: str) -> str:
  """The dataset name a built-in set's results carry: '<task>/builtin_test/top1'."""
  return f'{spec}_{split}'


def builtin_summary(name: str) -> str | None:
  """What a result dataset name measures ('held-out' for 'builtin_test'); None unless it is
  the `test` split of a built-in set."""
  return next((s.summary for spec, s in BUILTIN_SETS.items()
               if name == builtin_name(spec, 'test')), None)


def normalize_pixels(uint8_images: np.ndarray) -> np.ndarray:
  """uint8 (or [0, 255] float) HWC images -> float32 with CLIP's mean and std."""
  return ((np.asarray(uint8_images, np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD


def resize_center_crop(image: Image.Image, image_size: int) -> Image.Image:
  """Bicubic resize of the shorter side to `image_size`, then a centred square crop.

  The arithmetic follows torchvision's Resize(int) + CenterCrop, which open_clip's eval
  transform uses, so the same file gives the same pixels in both.
  """
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


def load_image(path: storage.PathLike, image_size: int) -> np.ndarray:
  """One image file (local or on a bucket) as float32 [image_size, image_size, 3],
  CLIP-normalised."""
  with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
    return normalize_pixels(np.asarray(resize_center_crop(image, image_size)))


@dataclasses.dataclass
class EvalData:
  """One split of an evaluation dataset, readable in sharded global batches.

  `batches(global_batch_size, mesh)` yields this host's padded batches with `image`,
  `mask`, `index` (the example's position in the split) and `label` when known.
  `captions[i]` are the captions of example i (retrieval sets).
  """
  name: str
  num_examples: int
  batches: Callable[[int, Mesh], Iterator[dict[str, np.ndarray]]]
  classnames: list[str] | None = None
  captions: list[list[str]] | None = None
  templates: tuple[str, ...] | None = None   # the dataset's own prompts, if it has any
  tokenized_captions: bool = False   # batches carry `text`: one tokenized caption per example
  skipped: list[str] = dataclasses.field(default_factory=list)   # unreadable files


def list_images(folder: storage.PathLike) -> list[str]:
  """Image files under `folder` (recursively), as '/'-separated relative paths, sorted."""
  return [f for f in storage.list_files(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]


def _file_batches(folder: str, files: Sequence[str], labels: np.ndarray, image_size: int,
                  skipped: list[str]) -> Callable[[int, Mesh], Iterator[dict[str, np.ndarray]]]:
  def load_one(index: int) -> np.ndarray | None:
    path = str(storage.join(folder, files[index]))
    try:
      return load_image(path, image_size)
    except (OSError, ValueError) as error:   # a corrupt file is skipped and counted
      skipped.append(f'{path}: {error}')
      return None

  def load_rows(indices: np.ndarray) -> dict[str, np.ndarray]:
    images = np.zeros((len(indices), image_size, image_size, 3), np.float32)
    mask = np.ones(len(indices), bool)
    # PIL decodes and resizes without the GIL: threads keep a host's cores busy.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
      for row, image in enumerate(pool.map(load_one, indices.tolist())):
        if image is None:
          mask[row] = False
        else:
          images[row] = image
    return {'image': images, 'mask': mask, 'label': labels[indices].astype(np.int32),
            'index': indices.astype(np.int32)}

  return lambda batch_size, mesh: host_batches(len(files), batch_size, mesh, load_rows)


def image_folder(folder: str, image_size: int, max_examples: int = 0, name: str = '') -> EvalData:
  """Classification from `folder/<class_name>/<image>`; optional captions.jsonl for retrieval.

  Class names are the sub-folder names with `_` read as a space; labels follow their
  sorted order. Without sub-folders, every image has label -1 (retrieval or embedding).
  """
  if not storage.is_dir(folder):
    raise FileNotFoundError(f'{folder}: not a directory; expected an image folder')
  files = list_images(folder)
  if not files:
    raise ValueError(f'{folder}: no image files ({", ".join(IMAGE_EXTENSIONS)}) found')
  class_dirs = sorted({f.split('/')[0] for f in files if '/' in f})
  classnames = [d.replace('_', ' ') for d in class_dirs] or None
  if classnames:
    files = [f for f in files if '/' in f]
    labels = np.array([class_dirs.index(f.split('/')[0]) for f in files], np.int32)
  else:
    labels = np.full(len(files), -1, np.int32)
  captions = None
  captions_path = storage.join(folder, 'captions.jsonl')
  if captions_path.exists():
    files, labels, captions = _read_captions(str(captions_path), files, labels)
  if max_examples and max_examples < len(files):
    # A fixed random subset, in file order: every class keeps its share.
    keep = np.sort(np.random.default_rng(0).permutation(len(files))[:max_examples])
    files, labels = [files[i] for i in keep], labels[keep]
    captions = [captions[i] for i in keep] if captions else None
  data = image_files(folder, files, image_size, labels, name=name or storage.name(folder))
  data.classnames, data.captions = classnames, captions
  return data


def image_files(folder: storage.PathLike, files: Sequence[str], image_size: int,
                labels: np.ndarray | None = None, name: str = '') -> EvalData:
  """Images `folder/<files[i]>` as example i (label -1 unless given); unreadable files
  are masked out and listed in `skipped`."""
  labels = np.full(len(files), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
  skipped: list[str] = []
  return EvalData(name=name or storage.name(folder), num_examples=len(files),
                  batches=_file_batches(folder, list(files), labels, image_size, skipped),
                  skipped=skipped)


def _read_captions(path: str, files: list[str], labels: np.ndarray
                   ) -> tuple[list[str], np.ndarray, list[list[str]]]:
  """Keeps the images that captions.jsonl describes, in the file's order."""
  label_of = dict(zip(files, labels.tolist()))
  kept, kept_labels, captions = [], [], []
  for line_number, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      image, texts = record['image'], record['captions']
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ValueError(f'{path}:{line_number}: expected a JSON object with "image" (a path '
                       'relative to the folder) and "captions" (a list of strings)') from None
    image = posixpath.normpath(str(image).replace(os.sep, '/'))
    if image not in label_of:
      raise ValueError(f'{path}:{line_number}: image {image!r} is not an image file of '
                       'the folder')
    if isinstance(texts, str):
      texts = [texts]
    if not texts:
      raise ValueError(f'{path}:{line_number}: image {image!r} has no captions')
    kept.append(image)
    kept_labels.append(label_of[image])
    captions.append([str(t) for t in texts])
  return kept, np.array(kept_labels, np.int32), captions


def builtin_scenes(split: str, image_size: int, max_examples: int = 0,
                   spec: str = 'builtin') -> EvalData:
  """The split `split` of the built-in set `spec` (BUILTIN_SETS; deterministic, no files)."""
  known = BUILTIN_SETS[spec]
  if split not in known.splits:
    raise ValueError(f'{spec}: unknown split {split!r}; expected one of '
                     f'{", ".join(known.splits)}')
  held_out, seed = known.splits[split]
  num = max_examples or known.size
  if known.distinct:
    records = builtin.retrieval_scenes(num, seed=seed, image_size=image_size)
  else:
    records = list(builtin.scenes(num, seed=seed, held_out=held_out, image_size=image_size))
  images = normalize_pixels(np.stack([r['image'] for r in records]))
  labels = np.array([r['label'] for r in records], np.int32)

  def load_rows(indices: np.ndarray) -> dict[str, np.ndarray]:
    return {'image': images[indices], 'label': labels[indices], 'index': indices.astype(np.int32)}

  return EvalData(name=builtin_name(spec, split), num_examples=len(records),
                  batches=lambda batch_size, mesh: host_batches(len(records), batch_size, mesh,
                                                                load_rows),
                  classnames=builtin.class_names(), captions=[list(r['caption']) for r in records],
                  templates=tuple(builtin.PROMPT_TEMPLATES))


def stream_dataset(source: dict, name: str, image_size: int, max_examples: int = 0,
                   tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None) -> EvalData:
  """TFDS or TFRecord shards through `clip_jax.data.make_eval_iterator` (tensorflow).

  `source` holds the keys of config.data.train (source, pattern, tfds_name, ...).
  `max_examples` is rounded up to whole global batches.
  """
  from clip_jax.data import pipeline, sources   # tensorflow stays out until a stream is read
  source = sources.Source(name=f'dataset {name!r}', **source)
  classnames = None
  if source.kind == 'tfds':
    label = source.tfds_builder().info.features[source.label_key or 'label']
    classnames = [n.replace('_', ' ') for n in getattr(label, 'names', None) or []] or None
    total = int(source.tfds_builder().info.splits[source.tfds_split].num_examples)
  else:
    total = None

  def batches(batch_size: int, mesh: Mesh) -> Iterator[dict[str, np.ndarray]]:
    local = host_batch_size(batch_size, mesh)
    iterator = pipeline.make_eval_iterator(source, batch_size=local, image_size=image_size,
                                           tokenizer=tokenizer)
    limit = -(-max_examples // batch_size) if max_examples else len(iterator)
    whole = limit >= len(iterator)
    yield from iterator if whole else iterator.take(limit)
    if whole:   # known once the stream is exhausted: undecodable examples became padding
      skipped.extend([f'{name}: an example that could not be decoded'] * iterator.num_skipped)

  skipped: list[str] = []
  return EvalData(name=name, num_examples=total or 0, batches=batches, classnames=classnames,
                  tokenized_captions=tokenizer is not None, skipped=skipped)


def stream_source(spec: str, split: str, data_dir: str | None) -> dict | None:
  """The data-pipeline source of a `tfds:` or `shards:` spec (None for the others)."""
  kind, _, location = spec.partition(':')
  if kind == 'tfds' and location:
    return dict(kind='tfds', tfds_name=location, tfds_split=split, data_dir=data_dir or '',
                label_key='label')
  if kind == 'shards' and location:
    return dict(kind='tfrecord', pattern=location.replace('{split}', split), label_key='label')
  return None


def check_readable(spec: str, *, split: str, image_size: int, data_dir: str | None,
                   mesh: Mesh, batch_size: int,
                   tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None) -> None:
  """Fails (naming what is wrong) unless the split exists and its first examples decode.

  Stream sets (tfds, shards) are checked by their first decodable record, without
  counting the split; folders and built-in sets by their first batch.
  """
  source = stream_source(spec, split, data_dir)
  if source is not None:
    from clip_jax.data import pipeline, sources  # tensorflow stays out until a stream is read
    pipeline.check_readable(sources.Source(name=f'dataset {spec!r}', **source), 0, 1)
    return
  data = open_dataset(spec, split=split, image_size=image_size, data_dir=data_dir,
                      max_examples=batch_size, tokenizer=tokenizer)
  if data.num_examples == 0:
    raise ValueError('no example')
  first = next(iter(data.batches(batch_size, mesh)), None)
  if first is None or not np.asarray(first['mask']).any():
    raise ValueError(f'none of the first {batch_size} examples could be read'
                     + (f' (e.g. {data.skipped[0]})' if data.skipped else ''))


def open_dataset(spec: str, *, split: str = 'test', image_size: int, data_dir: str | None = None,
                 max_examples: int = 0,
                 tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None) -> EvalData:
  """The split `split` of the dataset named by `spec` (see the module docstring).

  `tokenizer` is used by TFDS and shard datasets, whose pipeline tokenizes captions.
  """
  kind, _, location = spec.partition(':')
  if spec in BUILTIN_SETS:
    return builtin_scenes(split, image_size, max_examples, spec)
  if storage.is_url(spec) or (not location and storage.is_dir(spec)):
    kind, location = 'folder', spec
  if kind == 'folder':
    folder = storage.join(location, split)
    folder = folder if folder.is_dir() else storage.resolve(location)
    return image_folder(folder, image_size, max_examples, name=storage.name(location))
  source = stream_source(spec, split, data_dir)
  if source is not None and kind == 'tfds':
    return stream_dataset(source, location.split('/')[0].split(':')[0], image_size,
                          max_examples, tokenizer)
  if source is not None:
    folder = storage.resolve(source['pattern']).parent
    name = folder.name or 'shards'
    data = stream_dataset(source, name, image_size, max_examples, tokenizer)
    names_file = folder / CLASSNAMES_FILE
    if storage.is_file(names_file):
      data.classnames = [line.strip() for line in storage.read_text(names_file).splitlines()
                         if line.strip()]
    return data
  raise ValueError(f'dataset {spec!r}: expected {", ".join(BUILTIN_SETS)}, folder:PATH (or a '
                   'directory), tfds:NAME or shards:GLOB')
