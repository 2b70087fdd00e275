"""clip_benchmark's webdataset layout as an evaluation dataset (`--dataset=wds:ROOT`).

The layout is the one `clip_benchmark.datasets.builder.build_wds_dataset` reads
(clip-benchmark 1.6.2), which is how clip_benchmark and DataComp publish their test sets:

  ROOT/test/nshards.txt        the number of shards N (required, as there)
  ROOT/test/0.tar ... test/{N-1}.tar
  ROOT/classnames.txt          one class name per line, in label order
  ROOT/zeroshot_classification_templates.txt   one prompt per line, `{c}` for the class
  ROOT/dataset_type.txt        `retrieval` for image-text sets (absent: classification)

(`test` is the split; others live beside it.) A sample is the run of tar members that
share a key, as webdataset groups them: the image is the first of `KEY.webp`, `.png`,
`.jpg`, `.jpeg`; a classification sample has `KEY.cls` (the label as text), a retrieval
sample `KEY.txt` (its captions, one per line, all of them scored); `KEY.npy` (a metadata
vector: WILDS and fairness sets carry the groups of worst-group metrics) is kept when
present. Files are read as clip_benchmark reads them: every line of classnames.txt,
stripped, is a class (so labels keep their positions), every line of the templates file
a template.

Reading: the tars are streamed in shard order through `clip_jax.data.sources.wds_members`
(local or gs://, retried reads), never held whole. Every host reads the stream; each global
batch of raw samples is split with `clip_jax.data.eval_input`'s one host split, so a host
decodes only its contiguous part and every example is counted once. As every host sees
every sample, all of them know the captions and metadata of every example, and they agree
on the number of batches without counting the set first (one pass).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from typing import TYPE_CHECKING, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import storage
from clip_jax.data.eval_input import NO_LABEL, decode_images
from clip_jax.evaluate.datasets import CLASSNAMES_FILE, EvalData
from clip_jax.evaluate.features import host_batch_size, host_batches

if TYPE_CHECKING:
  from clip_jax.data.sources import StreamControl

IMAGE_MEMBERS = ('webp', 'png', 'jpg', 'jpeg')   # clip_benchmark's order of preference
LABEL_MEMBER = 'cls'
CAPTIONS_MEMBER = 'txt'
METADATA_MEMBER = 'npy'
NSHARDS_FILE = 'nshards.txt'
TEMPLATES_FILE = 'zeroshot_classification_templates.txt'
TYPE_FILE = 'dataset_type.txt'
DATASET_TYPES = ('classification', 'retrieval')


@dataclasses.dataclass(frozen=True)
class WdsLayout:
  """One split of a clip_benchmark webdataset: its shards and its side files."""
  root: str
  split: str
  dataset_type: str                       # 'classification' or 'retrieval'
  shards: tuple[str, ...]
  classnames: tuple[str, ...] | None = None
  templates: tuple[str, ...] | None = None


def _lines(path: storage.PathLike) -> list[str] | None:
  """Every line, stripped (clip_benchmark's reading); None when the file is absent."""
  if not storage.is_file(path):
    return None
  return [line.strip() for line in storage.read_text(path).splitlines()]


def read_layout(root: storage.PathLike, split: str = 'test') -> WdsLayout:
  """The layout under `root` (see the module docstring); errors name the file at fault."""
  root = storage.resolve(root)
  nshards_path = root / split / NSHARDS_FILE
  if not storage.is_file(nshards_path):
    raise FileNotFoundError(
        f'{nshards_path}: no such file; a clip_benchmark webdataset has {split}/{NSHARDS_FILE} '
        f'(the number of shards N) beside {split}/0.tar ... {split}/<N-1>.tar')
  text = storage.read_text(nshards_path).strip()
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f'{nshards_path}: expected a positive number of shards, got {text!r}')
  shards = tuple(str(root / split / f'{i}.tar') for i in range(int(text)))
  missing = [s for s in shards if not storage.is_file(s)]
  if missing:
    raise FileNotFoundError(f'{root}: {len(missing)} of the {len(shards)} shards that '
                            f'{split}/{NSHARDS_FILE} announces are missing, e.g. {missing[0]}')
  type_path = root / TYPE_FILE
  kind = (storage.read_text(type_path).strip().lower() if storage.is_file(type_path)
          else 'classification')
  if kind not in DATASET_TYPES:
    raise ValueError(f'{type_path}: dataset type {kind!r} is not supported; expected '
                     f'one of {", ".join(DATASET_TYPES)} (multilabel sets are not read yet)')
  templates = _lines(root / TEMPLATES_FILE)
  for number, template in enumerate(templates or [], 1):
    try:
      template.format(c='x')
    except (KeyError, IndexError, ValueError) as error:
      raise ValueError(f'{root / TEMPLATES_FILE}:{number}: template {template!r} cannot be '
                       f'filled with .format(c=name): {error!r}') from None
  classnames = _lines(root / CLASSNAMES_FILE) if kind == 'classification' else None
  return WdsLayout(root=str(root), split=split, dataset_type=kind, shards=shards,
                   classnames=tuple(classnames) if classnames is not None else None,
                   templates=tuple(templates) if templates else None)


def read_samples(layout: WdsLayout, control: StreamControl, max_examples: int = 0
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) per sample, in shard order: a sample ends where the key
  changes or an extension repeats (webdataset's grouping); at most `max_examples` (0: all).

  `control` stops the readers and holds a storage fault for its `check`.
  """
  from clip_jax.data import sources   # tensorflow stays out until a set is read
  count = 0
  for shard in layout.shards:
    key, parts = None, {}
    for member_key, extension, data in itertools.chain(
        sources.wds_members(shard, storage.RetryPolicy(), control), [(None, '', b'')]):
      if parts and (member_key != key or extension in parts):
        yield key, parts
        count += 1
        if max_examples and count >= max_examples:
          return
        parts = {}
      key = member_key
      if member_key is not None:
        parts[extension] = data


def _decode_label(data: bytes | None) -> int | None:
  try:
    return int(data.decode('utf-8').strip()) if data is not None else None
  except (UnicodeDecodeError, ValueError):
    return None


def _image(parts: dict[str, bytes]) -> bytes | None:
  return next((parts[m] for m in IMAGE_MEMBERS if m in parts), None)


def _problem(parts: dict[str, bytes], retrieval: bool) -> str | None:
  """Why a sample cannot be scored (None when it can), before its image is decoded."""
  if _image(parts) is None:
    return f'no image member ({", ".join(IMAGE_MEMBERS)})'
  if retrieval and not parts.get(CAPTIONS_MEMBER, b'').strip():
    return f'no captions ({CAPTIONS_MEMBER})'
  if not retrieval and _decode_label(parts.get(LABEL_MEMBER)) is None:
    return f'no integer label ({LABEL_MEMBER})'
  return None


def wds_dataset(root: storage.PathLike, *, split: str, image_size: int,
                max_examples: int = 0) -> EvalData:
  """An `EvalData` over the split `split` of the webdataset at `root`.

  Classification sets carry their class names and templates; `captions` (retrieval) and
  `metadata` (`.npy` members, None where a sample has none) are filled in example order as
  the batches are read, identically on every host, and `num_examples` once a pass is
  done. A sample without an image, a label (classification) or a caption (retrieval) is
  masked out and listed in `skipped`, like an undecodable image.
  """
  layout = read_layout(root, split)
  retrieval = layout.dataset_type == 'retrieval'
  data = EvalData(name=storage.name(root), num_examples=None, batches=None,
                  classnames=list(layout.classnames) if layout.classnames is not None else None,
                  captions=[] if retrieval else None, templates=layout.templates, metadata=[])

  def side_data(start: int, chunk: list[tuple[str, dict[str, bytes]]]) -> list[str | None]:
    """Keeps the captions and metadata of every sample of a global batch (every host
    does); returns why each sample cannot be scored."""
    problems = []
    for position, (key, parts) in enumerate(chunk, start):
      if retrieval:
        data.captions.append(parts.get(CAPTIONS_MEMBER, b'').decode('utf-8', 'replace')
                             .splitlines())
      metadata = None
      if METADATA_MEMBER in parts:
        try:
          metadata = np.load(io.BytesIO(parts[METADATA_MEMBER]), allow_pickle=False)
        except ValueError as error:
          raise ValueError(f'{data.name}: example {position} ({key}): unreadable '
                           f'{key}.{METADATA_MEMBER}: {error}') from None
      data.metadata.append(metadata)
      problems.append(_problem(parts, retrieval))
    return problems

  def batches(global_batch_size: int, mesh: Mesh) -> Iterator[dict[str, np.ndarray]]:
    from clip_jax.data import sources   # tensorflow stays out until a set is read
    for side in (data.captions, data.metadata, data.skipped):
      if side is not None:
        side.clear()
    chunk_size = host_batch_size(global_batch_size, mesh) * jax.process_count()
    control = sources.StreamControl()
    samples = read_samples(layout, control, max_examples)
    start = 0
    try:
      while chunk := list(itertools.islice(samples, chunk_size)):
        problems = side_data(start, chunk)

        def load_rows(indices: np.ndarray, chunk=chunk, problems=problems, start=start
                      ) -> dict[str, np.ndarray]:
          """This host's part of the global batch: only these images are decoded."""
          items = [None if problems[i] else _image(chunk[i][1]) for i in indices]
          images, undecodable = decode_images(items, image_size)
          reasons = [problems[i] or why for i, why in zip(indices, undecodable)]
          for i, why in zip(indices, reasons):
            if why:
              data.skipped.append(f'{data.name}: example {start + i} ({chunk[i][0]}): {why}')
          mask = np.array([why is None for why in reasons], bool)
          labels = [_decode_label(chunk[i][1].get(LABEL_MEMBER)) if ok and not retrieval
                    else NO_LABEL for i, ok in zip(indices, mask)]
          return {'image': images, 'mask': mask, 'label': np.array(labels, np.int32),
                  'index': (start + indices).astype(np.int32)}

        yield from host_batches(len(chunk), global_batch_size, mesh, load_rows)
        control.check()
        start += len(chunk)
      data.num_examples = start
    finally:
      samples.close()
      control.finish()
    control.check()

  data.batches = batches
  return data
