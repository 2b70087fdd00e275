"""Evaluation datasets: an image folder (no tensorflow), the built-in scenes, and TFDS,
TFRecord or tar shards read by the data pipeline (tensorflow, imported lazily).

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
  shards:GLOB   TFRecord shards written by `clip_jax.data.write_tfrecord_shards`, or
                img2dataset .tar shards when every part of GLOB ends in .tar; `{split}` in
                GLOB is replaced by the split (e.g. shards:/data/pets-{split}-*.tfrecord);
                labels from the `label` feature (tars: the KEY.cls member), class names
                (label order, one per line) from `classnames.txt` beside them
  wds:ROOT      clip_benchmark's webdataset layout (ROOT/<split>/nshards.txt and
                0.tar ..., classnames.txt, zeroshot_classification_templates.txt,
                dataset_type.txt; `clip_jax.evaluate.wds`): classification, or retrieval
                on every caption of each image; its own class names and templates

Every set goes through `clip_jax.data.eval_input`: one decoder, resize and crop (open_clip's
eval transform) and one host split, whatever the source. TFDS and shards are read forward
by the data pipeline's eval iterator; their retrieval uses the first caption of each
example, which the iterator tokenizes; wds sets are streamed in one pass and keep every
caption. `max_examples` keeps a fixed random subset of a folder (its listing is free) and
the first examples of the other sets (a stream is not read past them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from typing import Callable, Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

from clip_jax import storage
from clip_jax.data import builtin
# load_image and normalize_pixels are read from here too (embed, the notebook).
from clip_jax.data.eval_input import (NO_LABEL, decode_images, image_pixels,  # noqa: F401
                                      load_image, normalize_pixels)
from clip_jax.evaluate.features import host_batch_size, host_batches

SPEC_KINDS = ('folder', 'tfds', 'shards', 'wds')   # the `KIND:` prefixes of a dataset spec
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


@dataclasses.dataclass
class EvalData:
  """One split of an evaluation dataset, readable in sharded global batches.

  `batches(global_batch_size, mesh)` yields this host's padded batches with `image`,
  `mask`, `index` (the example's position in the split) and `label` when known.
  `captions[i]` are the captions of example i (retrieval sets); `metadata[i]` its
  metadata vector (wds `.npy` members: the groups of worst-group metrics).
  """
  name: str
  num_examples: int | None   # None: a wds stream, counted as it is read (set after a pass)
  batches: Callable[[int, Mesh], Iterator[dict[str, np.ndarray]]]
  classnames: list[str] | None = None
  captions: list[list[str]] | None = None
  templates: tuple[str, ...] | None = None   # the dataset's own prompts, if it has any
  tokenized_captions: bool = False   # batches carry `text`: one tokenized caption per example
  skipped: list[str] = dataclasses.field(default_factory=list)   # unreadable files
  metadata: list[np.ndarray | None] | None = None


def list_images(folder: storage.PathLike) -> list[str]:
  """Image files under `folder` (recursively), as '/'-separated relative paths, sorted."""
  return [f for f in storage.list_files(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]


def _file_batches(folder: str, files: Sequence[str], labels: np.ndarray, image_size: int,
                  skipped: list[str]) -> Callable[[int, Mesh], Iterator[dict[str, np.ndarray]]]:
  def load_rows(indices: np.ndarray) -> dict[str, np.ndarray]:
    paths = [str(storage.join(folder, files[i])) for i in indices]
    images, problems = decode_images(paths, image_size, storage.read_bytes)
    # A corrupt file is masked out and counted.
    skipped.extend(f'{path}: {problem}' for path, problem in zip(paths, problems) if problem)
    mask = np.array([p is None for p in problems], bool)
    return {'image': images, 'mask': mask, 'index': indices.astype(np.int32),
            'label': np.where(mask, labels[indices], NO_LABEL).astype(np.int32)}

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
    labels = np.full(len(files), NO_LABEL, np.int32)
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
  labels = (np.full(len(files), NO_LABEL, np.int32) if labels is None
            else np.asarray(labels, np.int32))
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
  images = np.stack([image_pixels(r['image'], image_size) for r in records])
  labels = np.array([r['label'] for r in records], np.int32)

  def load_rows(indices: np.ndarray) -> dict[str, np.ndarray]:
    return {'image': images[indices], 'label': labels[indices], 'index': indices.astype(np.int32)}

  return EvalData(name=builtin_name(spec, split), num_examples=len(records),
                  batches=lambda batch_size, mesh: host_batches(len(records), batch_size, mesh,
                                                                load_rows),
                  classnames=builtin.class_names(), captions=[list(r['caption']) for r in records],
                  templates=tuple(builtin.PROMPT_TEMPLATES))


# The label each kind of stream set is read from: our shards' feature, img2dataset's
# KEY.cls member, a TFDS ClassLabel.
STREAM_LABEL_KEYS = {'tfrecord': 'label', 'wds': 'cls', 'tfds': 'label'}


def stream_dataset(section: dict, name: str, image_size: int, max_examples: int = 0,
                   tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None) -> EvalData:
  """TFDS or shards through `clip_jax.data.make_eval_iterator` (tensorflow).

  `section` holds keys of config.data.train (source, pattern, tfds_name, ...); the kind
  is inferred from the pattern when `source` is not given. Its examples are counted here,
  up to `max_examples` (the count is kept for the process: the batches do not recount).
  """
  from clip_jax.data import pipeline, sources   # tensorflow stays out until a stream is read
  kind = section.get('source') or sources.infer_kind(section.get('pattern', ''))
  section = dict(section, source=kind, label_key=STREAM_LABEL_KEYS[kind])
  source = sources.Source.from_config(section, f'dataset {name!r}')
  classnames = None
  if source.kind == 'tfds':
    label = source.tfds_builder().info.features[source.label_key]
    classnames = [n.replace('_', ' ') for n in getattr(label, 'names', None) or []] or None
  num_examples = pipeline.count_examples(source, max_examples)
  skipped: list[str] = []

  def batches(batch_size: int, mesh: Mesh) -> Iterator[dict[str, np.ndarray]]:
    iterator = pipeline.make_eval_iterator(source, batch_size=host_batch_size(batch_size, mesh),
                                           image_size=image_size, tokenizer=tokenizer,
                                           max_examples=max_examples)
    yield from iterator
    skipped.extend(iterator.skipped)

  return EvalData(name=name, num_examples=num_examples, batches=batches, classnames=classnames,
                  tokenized_captions=tokenizer is not None, skipped=skipped)


def check_readable(spec: str, *, split: str, image_size: int, data_dir: str | None,
                   mesh: Mesh, batch_size: int,
                   tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None) -> None:
  """Fails (naming what is wrong) unless the split exists and one of its first
  `batch_size` examples decodes (streams are read no further)."""
  data = open_dataset(spec, split=split, image_size=image_size, data_dir=data_dir,
                      max_examples=batch_size, tokenizer=tokenizer)
  if data.num_examples == 0:   # a wds stream (None) shows it in its first batch below
    raise ValueError('no example')
  first = next(iter(data.batches(batch_size, mesh)), None)
  if first is None or not np.asarray(first['mask']).any():
    raise ValueError(f'no readable sample: none of the first {batch_size} examples could be '
                     'read' + (f' (e.g. {data.skipped[0]})' if data.skipped else ''))


def open_dataset(spec: str, *, split: str = 'test', image_size: int, data_dir: str | None = None,
                 max_examples: int = 0,
                 tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None) -> EvalData:
  """The split `split` of the dataset named by `spec` (see the module docstring).

  `tokenizer` is used by TFDS and shard datasets, whose pipeline tokenizes captions.
  """
  kind, _, location = spec.partition(':')
  if spec in BUILTIN_SETS:
    return builtin_scenes(split, image_size, max_examples, spec)
  # A bare URL or directory is a folder; 'shards:gs://...' and 'wds:gs://...' are not.
  if (storage.is_url(spec) and kind not in SPEC_KINDS) or (not location and storage.is_dir(spec)):
    kind, location = 'folder', spec
  if kind == 'folder':
    folder = storage.join(location, split)
    folder = folder if folder.is_dir() else storage.resolve(location)
    return image_folder(folder, image_size, max_examples, name=storage.name(location))
  if kind == 'tfds' and location:
    section = dict(source='tfds', tfds_name=location, tfds_split=split, data_dir=data_dir or '')
    return stream_dataset(section, location.split('/')[0].split(':')[0], image_size,
                          max_examples, tokenizer)
  if kind == 'shards' and location:
    pattern = location.replace('{split}', split)
    folder = storage.resolve(pattern).parent
    data = stream_dataset(dict(pattern=pattern), folder.name or 'shards', image_size,
                          max_examples, tokenizer)
    names_file = folder / CLASSNAMES_FILE
    if storage.is_file(names_file):
      data.classnames = [line.strip() for line in storage.read_text(names_file).splitlines()
                         if line.strip()]
    return data
  if kind == 'wds' and location:
    from clip_jax.evaluate.wds import wds_dataset   # wds builds on EvalData
    return wds_dataset(location, split=split, image_size=image_size, max_examples=max_examples)
  raise ValueError(f'dataset {spec!r}: expected {", ".join(BUILTIN_SETS)}, folder:PATH (or a '
                   'directory), tfds:NAME, shards:GLOB or wds:ROOT')
