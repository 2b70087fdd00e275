"""Where image-text pairs come from: TFRecord shards, img2dataset .tar shards, TFDS.

Every source yields *raw* elements that `Source.parse` turns into one sample
`{'image': encoded bytes (tf.string), 'captions': tf.string [K], 'label': tf.int64}`
(label -1 when there is none). Parsing happens after the raw elements are counted,
so a record that fails to parse is skipped *and counted* like a corrupt image.

TFRecord features (`tf.train.Example`, written by `clip_jax.data.shards`):
  image    bytes          the encoded image (JPEG, PNG, GIF, BMP or WebP)
  caption  bytes list     one or more captions (training picks one at random)
  label    int64          optional class index
  key      bytes          optional sample id (e.g. the source file path)
img2dataset's TFRecord names (`jpg`/`jpeg`/`png`/`webp`, `txt`) are found without
flags: with empty `image_key` / `caption_key` each record uses the first of the
candidate features it has. Other names are set with `image_key` / `caption_key`.

The kind is inferred from the pattern unless `source` is given: `*.tar` -> wds,
`tfds:NAME` -> tfds, anything else -> tfrecord (`infer_kind`).

Webdataset `.tar` shards (img2dataset layout): members `KEY.jpg|jpeg|png|webp`,
`KEY.txt` (the caption), `KEY.json`, optionally `KEY.cls` (a label); the members of one
sample are adjacent.

TFDS: a dataset already prepared under `data_dir` (nothing is downloaded).

Paths are local (relative ones from the current directory) or URLs (`gs://`). Every byte
of a TFRecord or tar shard is read in Python through clip_jax.storage (the TFRecord
framing in clip_jax.data.tfrecord, tars with `tarfile`) and handed to tf.data with
`from_generator`. A pattern is a comma-separated list of globs and `{00000..00099}`
ranges (webdataset's brace notation).

Storage faults are not data faults. A read that fails (connection reset, HTTP 5xx, an
object that vanished) is retried from its byte offset (`config.data.read_attempts`,
`config.data.read_retry_seconds`). When it keeps failing, the reader records the
StorageError in the stream's `StreamControl` and the stream's iterator raises it before
it hands out any batch the fault could have touched: tf.data's `ignore_errors`, which drops
corrupt samples, would otherwise swallow it and end the shard early. A file named by a
range that does not exist is skipped with a warning (img2dataset leaves gaps). Corrupt
records, undecodable images and empty captions are skipped and counted; a shard whose
framing breaks off is read up to there (one skipped sample is counted for the rest).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import logging
import posixpath
import re
import tarfile
import threading
import weakref
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from clip_jax import storage
from clip_jax.data import tfrecord
from clip_jax.metrics_writer import DATA_SKIPPED

logger = logging.getLogger(__name__)

SOURCE_KINDS = ('tfrecord', 'wds', 'tfds')
TFDS_PREFIX = 'tfds:'       # a pattern 'tfds:NAME' names a TFDS dataset
SAMPLE_KEY = 'key'          # the optional TFRecord feature holding a sample's id
# Per source kind, what an empty image_key / caption_key means: candidates in order of
# preference (our shards' names first, then img2dataset's).
DEFAULT_IMAGE_KEY = {'tfrecord': 'image,jpg,jpeg,png,webp', 'wds': 'jpg,jpeg,png,webp',
                     'tfds': 'image'}
DEFAULT_CAPTION_KEY = {'tfrecord': 'caption,txt', 'wds': 'txt', 'tfds': ''}
_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')


def _split_top_level_commas(pattern: str) -> list[str]:
  parts, depth, current = [], 0, ''
  for char in pattern:
    depth += {'{': 1, '}': -1}.get(char, 0)
    if char == ',' and depth == 0:
      parts.append(current)
      current = ''
    else:
      current += char
  return [p.strip() for p in parts + [current] if p.strip()]


def _expand_ranges(pattern: str) -> list[str]:
  """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar'] (zero padding kept)."""
  match = _RANGE.search(pattern)
  if not match:
    return [pattern]
  first, last = match.group(1), match.group(2)
  width = len(first) if first.startswith('0') else 0
  expanded = []
  for number in range(int(first), int(last) + 1):
    expanded += _expand_ranges(pattern[:match.start()] + str(number).zfill(width) +
                               pattern[match.end():])
  return expanded


def expand_pattern(pattern: str | list[str] | tuple[str, ...], name: str = 'pattern') -> list[str]:
  """Files named by a pattern (or a list of files/patterns), in a stable sorted order.

  Globs are listed through clip_jax.storage; range-expanded and plain names are kept
  (a missing one is logged and skipped when read). Local paths come back absolute.
  """
  items = list(pattern) if isinstance(pattern, (list, tuple)) else _split_top_level_commas(pattern)
  files = []
  for item in items:
    for path in _expand_ranges(item):
      if any(c in path for c in '*?['):
        files += storage.glob(path)
      else:
        files.append(str(storage.resolve(path)))
  if not files:
    raise ValueError(f'{name}: no file matches {pattern!r}; expected globs or {{000..099}} '
                     'ranges, comma-separated, of local or gs:// paths')
  return sorted(set(files))


def infer_kind(pattern: str) -> str:
  """The kind a pattern names: 'tfds:NAME' -> tfds, all parts `.tar` -> wds, else tfrecord."""
  if pattern.startswith(TFDS_PREFIX):
    return 'tfds'
  parts = _split_top_level_commas(pattern)
  if parts and all(part.lower().endswith('.tar') for part in parts):
    return 'wds'
  return 'tfrecord'


def _candidates(keys: str) -> list[str]:
  return [k.strip() for k in keys.split(',') if k.strip()]


def _first_present(values: list[tf.Tensor], present: Any) -> tf.Tensor:
  """The first of `values` for which `present(value)` holds (else the last)."""
  chosen = values[-1]
  for value in reversed(values[:-1]):
    chosen = tf.cond(present(value), lambda v=value: v, lambda c=chosen: c)
  return chosen


def describe_first_record(source: 'Source', path: str) -> str:
  """'jpg (bytes), txt (bytes), width (int64)': what the first record of a shard holds."""
  control = StreamControl()
  try:
    if source.kind == 'tfrecord':
      payload = next(iter(_tfrecord_payloads(path, source.retry, control)), None)
      if not payload:
        return 'no readable record'
      example = tf.train.Example.FromString(payload)
      return ', '.join(f'{name} ({feature.WhichOneof("kind").replace("_list", "")})'
                       for name, feature in sorted(example.features.feature.items()))
    members, first_key = [], None
    for key, extension, _ in wds_members(path, source.retry, control):
      if first_key not in (None, key):
        break
      first_key = key
      members.append(extension)
    return (f'members {", ".join(f"{first_key}.{e}" for e in members)}' if members
            else 'no readable member')
  finally:
    control.finish()


def host_files(files: list[str], process_index: int, process_count: int,
               name: str = 'pattern') -> list[str]:
  """This host's share of the files: every `process_count`-th one from `process_index`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if len(files) < process_count:
    raise ValueError(f'{name}: {len(files)} file(s) cannot be split over {process_count} hosts; '
                     'write at least one shard per host')
  return files[process_index::process_count]


@functools.cache
def tensorflow_on_cpu() -> None:
  """Hides the GPUs from tensorflow, once, before its first op: the accelerators belong to
  JAX, and tf.data needs only the CPU. Every stream calls it (through StreamControl), so
  importing this package changes nothing."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):   # tensorflow already initialised, or built without GPUs
    pass


class StreamControl:
  """What a tf.data stream fed by Python readers needs from outside: faults and a stop.

  Faults: tf.data turns an exception of a `from_generator` reader into an element error,
  and `ignore_errors` (there to drop corrupt samples) would drop it too. The reader
  records its StorageError here first, and the stream's iterator raises it (`check`).

  Stop: a tf.data iterator whose Python readers are running must not be destroyed from
  Python: its destructor waits for them with the interpreter lock held, and they need
  that lock to finish (a deadlock). So a stream is iterated through its control
  (`iterate`) and ended by it (`finish`): the readers return at their next record
  (`stopped`), buffers that would only delay the end are cut (`dataset.take_while(
  control.keep_going)` inside the stream), and the iterator is run to its end, after
  which nothing is in flight and it can be dropped. Streams still open when the
  interpreter exits are finished then, while tensorflow is still whole.
  """

  LOGGED_SKIPS = 5   # the first few skipped samples of a stream are logged, with where

  def __init__(self):
    tensorflow_on_cpu()   # before the Variable below, tensorflow's first op
    self._lock = threading.Lock()
    self._skips_logged = 0
    self._errors: list[storage.StorageError] = []
    self._stopped = threading.Event()
    self._running = tf.Variable(True, trainable=False)
    self._iterator: Iterator[Any] | None = None
    _OPEN_STREAMS.add(self)

  def record(self, error: storage.StorageError) -> None:
    with self._lock:
      if not self.stopped:   # a reader cut short by the stop is no fault
        self._errors.append(error)

  def note_skip(self, file: bytes, record: Any, sample: bytes, problem: bytes) -> bool:
    """Logs a skipped sample (file, record index, sample key, why), the first few only."""
    with self._lock:
      self._skips_logged += 1
      count = self._skips_logged
    if count <= self.LOGGED_SKIPS:
      key = sample.decode('utf-8', 'replace')
      logger.warning('skipped a sample (%s): %s, record %d%s%s', problem.decode(),
                     file.decode('utf-8', 'replace'), int(record), f', key {key}' if key else '',
                     f'; further skips are only counted ({DATA_SKIPPED})'
                     if count == self.LOGGED_SKIPS else '')
    return True

  def check(self) -> None:
    """Raises the first recorded StorageError, if any."""
    with self._lock:
      if self._errors:
        raise self._errors[0]

  @property
  def stopped(self) -> bool:
    return self._stopped.is_set()

  @property
  def stop_event(self) -> threading.Event:
    """Set when the stream is finished: readers stop retrying and waiting."""
    return self._stopped

  def keep_going(self, *unused: Any) -> tf.Tensor:
    """A take_while predicate: True until the stream is finished."""
    return self._running.read_value()

  def iterate(self, dataset: tf.data.Dataset) -> Iterator[Any]:
    """Numpy elements of `dataset`, the stream this control ends."""
    self._iterator = dataset.as_numpy_iterator()
    return self._iterator

  def finish(self) -> None:
    """Stops the readers and runs the iterator to its end (then it is safe to drop)."""
    iterator, self._iterator = self._iterator, None
    if self.stopped and iterator is None:
      return   # finished already (e.g. at exit, before the garbage collector got here)
    self._stopped.set()
    self._running.assign(False)
    if iterator is not None:
      for _ in iterator:
        pass


_OPEN_STREAMS: 'weakref.WeakSet[StreamControl]' = weakref.WeakSet()


@atexit.register
def _finish_open_streams() -> None:
  for control in list(_OPEN_STREAMS):
    control.finish()


@contextlib.contextmanager
def _shard(path: str, retry: storage.RetryPolicy, control: StreamControl
           ) -> Iterator[Any]:
  """A retrying stream over a shard (None, with a warning, if the file does not exist).

  A StorageError, opening or reading, is recorded in `control` on its way out.
  """
  try:
    try:
      stream = storage.open_for_reading(path, retry, control.stop_event)
    except FileNotFoundError:
      logger.warning('skipping missing file %s', path)
      stream = None
    with stream if stream is not None else contextlib.nullcontext():
      yield stream
  except storage.StorageError as error:
    control.record(error)
    raise


def _tfrecord_payloads(path: str, retry: storage.RetryPolicy,
                       control: StreamControl) -> Iterator[bytes]:
  """Serialized records of one TFRecord file; b'' for a corrupt one (skipped and counted)."""
  with _shard(path, retry, control) as stream:
    if stream is None:
      return
    try:
      for payload in tfrecord.read_records(stream, path):
        if control.stopped:
          return
        yield b'' if payload is None else payload
    except tfrecord.CorruptShardError as error:
      logger.warning('skipping the rest of %s', error)
      yield b''


def wds_members(path: str, retry: storage.RetryPolicy, control: StreamControl
                ) -> Iterator[tuple[str, str, bytes]]:
  """(sample key, extension, data) of each file member of a tar; stops at damage (logged).
  Also read by clip_jax.evaluate.wds (clip_benchmark's layout)."""
  with _shard(path, retry, control) as stream:
    if stream is None:
      return
    try:
      with tarfile.open(fileobj=stream, mode='r|*') as tar:
        for member in tar:
          if control.stopped:
            return
          if not member.isfile():
            continue
          folder, base = posixpath.split(member.name)
          if '.' not in base or base.startswith('.'):
            continue
          stem, extension = base.split('.', 1)
          data = tar.extractfile(member).read()
          yield posixpath.join(folder, stem), extension.lower(), data
    except (tarfile.TarError, EOFError) as error:
      logger.warning('skipping the rest of unreadable shard %s: %s', path, error)


def wds_samples(path: str, image_extensions: tuple[str, ...], caption_extension: str,
                label_extension: str = '', retry: storage.RetryPolicy = storage.RetryPolicy(),
                control: StreamControl | None = None
                ) -> Iterator[tuple[bytes, np.ndarray, int, bytes]]:
  """(image bytes, captions, label, sample key) per sample of an img2dataset tar shard.

  A sample without an image or a caption yields an empty value (skipped and counted
  downstream), so every sample the shard holds is seen by the skip counter.
  """
  def finish(key: str, parts: dict[str, bytes]):
    image = next((parts[e] for e in image_extensions if e in parts), b'')
    caption = parts.get(caption_extension, b'')
    label = -1
    if label_extension and label_extension in parts:
      try:
        label = int(parts[label_extension].decode('utf-8').strip())
      except ValueError:
        label = -1
    return image, np.array([caption], dtype=object), label, key.encode('utf-8')

  if isinstance(path, bytes):
    path = path.decode('utf-8')
  wanted = set(image_extensions) | {caption_extension, label_extension}
  key, parts = None, {}
  for sample_key, extension, data in wds_members(path, retry, control or StreamControl()):
    if sample_key != key:
      if parts:
        yield finish(key, parts)
      key, parts = sample_key, {}
    if extension in wanted:
      parts[extension] = data
  if parts:
    yield finish(key, parts)


_CHUNK = 64


def _chunks(elements: Iterator[Any]) -> Iterator[Any]:
  """Up to `_CHUNK` elements at a time: arrays of bytes, or tuples of column arrays."""
  rows = []
  for element in itertools.chain(elements, [None]):
    if element is not None:
      rows.append(element)
    if rows and (len(rows) == _CHUNK or element is None):
      if isinstance(rows[0], tuple):
        yield tuple(np.array(column, dtype=object if isinstance(column[0], (bytes, np.ndarray))
                             else np.int64) for column in zip(*rows))
      else:
        yield np.array(rows, dtype=object)
      rows = []


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset: its kind, where it is, and the names of its fields.

  Empty `image_key` / `caption_key` take the kind's defaults (DEFAULT_IMAGE_KEY,
  DEFAULT_CAPTION_KEY). For wds they are file extensions (the image key lists the
  accepted ones in order of preference); for tfds, feature paths ('/' nests, e.g.
  'captions/text'). `label_key` '' means no label. `caption_template` (e.g.
  'a photo of a {}.') makes captions from class names when a TFDS set has none.
  """
  kind: str = 'tfrecord'
  pattern: str = ''
  tfds_name: str = ''
  tfds_split: str = 'train'
  data_dir: str = ''
  image_key: str = ''
  caption_key: str = ''
  label_key: str = ''
  caption_template: str = ''
  name: str = 'source'       # how errors name it, e.g. 'config.data.train'
  retry: storage.RetryPolicy = storage.RetryPolicy()   # reads of shards

  def __post_init__(self):
    if self.kind not in SOURCE_KINDS:
      raise ValueError(f'{self.name}.source: unknown {self.kind!r}; expected one of '
                       f'{", ".join(SOURCE_KINDS)}')
    if self.kind == 'tfds' and not self.tfds_name:
      raise ValueError(f'{self.name}.tfds_name: empty; source "tfds" needs a dataset name')
    if self.kind != 'tfds' and not self.pattern:
      raise ValueError(f'{self.name}.pattern: empty; source {self.kind!r} needs files '
                       '(globs or {00000..00099} ranges)')
    if self.caption_template and '{}' not in self.caption_template:
      raise ValueError(f'{self.name}.caption_template: {self.caption_template!r} has no "{{}}" '
                       'for the class name')

  @classmethod
  def from_config(cls, section: Mapping[str, Any], name: str = 'config.data.train',
                  retry: storage.RetryPolicy = storage.RetryPolicy()) -> 'Source':
    """From a config.data.train-like section; an empty `source` is inferred from the
    pattern (`infer_kind`), and a pattern 'tfds:NAME' names the TFDS dataset."""
    fields = {f.name for f in dataclasses.fields(cls)} - {'kind', 'name', 'retry'}
    values = {k: section[k] for k in fields if k in section}
    pattern = values.get('pattern', '')
    kind = section.get('source', '') or (
        'tfds' if not pattern and values.get('tfds_name') else infer_kind(pattern))
    if kind == 'tfds' and pattern.startswith(TFDS_PREFIX):
      values['tfds_name'], values['pattern'] = pattern[len(TFDS_PREFIX):], ''
    elif kind == 'tfds' and pattern:
      raise ValueError(f'{name}.pattern: {pattern!r} with source "tfds"; name the dataset '
                       f'with {name}.tfds_name or a pattern "tfds:NAME"')
    return cls(kind=kind, name=name, retry=retry, **values)

  @property
  def images(self) -> str:
    return self.image_key or DEFAULT_IMAGE_KEY[self.kind]

  @property
  def captions(self) -> str:
    return self.caption_key or DEFAULT_CAPTION_KEY[self.kind]

  def files(self) -> list[str]:
    return expand_pattern(self.pattern, f'{self.name}.pattern')

  def read_file(self, path: tf.Tensor, control: StreamControl) -> tf.data.Dataset:
    """Raw elements of one file, read in Python through clip_jax.storage (see the module
    docstring); a storage fault is recorded in `control`. Python hands tf.data up to
    `_CHUNK` elements per call (each call costs about as much as decoding a small image)."""
    if self.kind == 'tfrecord':
      return tf.data.Dataset.from_generator(
          lambda p: _chunks(_tfrecord_payloads(p.decode('utf-8'), self.retry, control)),
          args=(path,), output_signature=tf.TensorSpec([None], tf.string)).unbatch()
    extensions = tuple(e.strip().lower() for e in self.images.split(',') if e.strip())
    return tf.data.Dataset.from_generator(
        lambda p: _chunks(wds_samples(p, extensions, self.captions.lower(),
                                      self.label_key.lower(), self.retry, control)),
        args=(path,), output_signature=(tf.TensorSpec([None], tf.string),
                                        tf.TensorSpec([None, 1], tf.string),
                                        tf.TensorSpec([None], tf.int64),
                                        tf.TensorSpec([None], tf.string))).unbatch()

  def parse(self, *raw: Any) -> dict[str, tf.Tensor]:
    """A raw element -> {'image', 'captions' [K], 'label', 'key'}; bad records raise (and
    are skipped). `key` is the sample's id ('' when the record has none).

    Takes the element whole or, as Dataset.map passes a tuple, its parts.
    """
    raw = raw[0] if len(raw) == 1 else raw
    if self.kind == 'tfrecord':
      # Every candidate name is parsed (absent ones come back empty); each record uses
      # the first candidate it has, so shards that name their features differently mix.
      images, captions = _candidates(self.images), _candidates(self.captions)
      features = {k: tf.io.FixedLenFeature([], tf.string, default_value='') for k in images}
      features.update({k: tf.io.VarLenFeature(tf.string) for k in captions})
      if self.label_key:
        features[self.label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
      features.setdefault(SAMPLE_KEY, tf.io.FixedLenFeature([], tf.string, default_value=''))
      parsed = tf.io.parse_single_example(raw, features)
      label = parsed[self.label_key] if self.label_key else tf.constant(-1, tf.int64)
      image = _first_present([parsed[k] for k in images], lambda v: tf.strings.length(v) > 0)
      texts = _first_present([tf.sparse.to_dense(parsed[k], default_value='') for k in captions],
                             lambda v: tf.size(v) > 0)
      return {'image': image, 'captions': texts, 'label': label, 'key': parsed[SAMPLE_KEY]}
    if self.kind == 'wds':
      image, captions, label, key = raw
      return {'image': image, 'captions': captions, 'label': label, 'key': key}
    return dict(raw, key=tf.constant(''))   # tfds: already parsed by tfds_dataset

  def tfds_builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
      data_dir = str(storage.resolve(self.data_dir)) if self.data_dir else None
      builder = tfds.builder(self.tfds_name, data_dir=data_dir)
    except Exception as error:  # pylint: disable=broad-except  (tfds raises many kinds)
      raise ValueError(f'{self.name}.tfds_name: cannot load TFDS dataset {self.tfds_name!r} '
                       f'from data_dir {self.data_dir!r}: {error}') from error
    if not storage.exists(storage.join(builder.data_dir, 'dataset_info.json')):
      raise ValueError(f'{self.name}.tfds_name: {self.tfds_name!r} is not prepared under '
                       f'{self.name}.data_dir={self.data_dir!r} (found nothing at '
                       f'{builder.data_dir}); nothing is downloaded: prepare it first')
    return builder

  def _tfds_split_builder(self):
    """The builder, once the split is known to be one of its splits."""
    builder = self.tfds_builder()
    if self.tfds_split not in builder.info.splits:
      raise ValueError(f'{self.name}.tfds_split: {self.tfds_split!r} not in {self.tfds_name} '
                       f'(splits: {", ".join(builder.info.splits)})')
    return builder

  def tfds_num_examples(self) -> int:
    """The size of the TFDS split, from its metadata (nothing is read)."""
    return int(self._tfds_split_builder().info.splits[self.tfds_split].num_examples)

  def tfds_dataset(self, process_index: int, process_count: int) -> tuple[tf.data.Dataset, int]:
    """This host's even share of the TFDS split as parsed samples, and its size."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = self._tfds_split_builder()
    split = tfds.even_splits(self.tfds_split, n=process_count)[process_index]
    features = builder.info.features
    image_key, caption_key = self.images, self.captions

    def feature(tree: Any, path: str) -> Any:
      for part in path.split('/'):
        tree = tree[part]
      return tree

    try:
      feature(features, image_key)
    except KeyError:
      raise ValueError(f'{self.name}.image_key: {image_key!r} is not a feature of '
                       f'{self.tfds_name} ({", ".join(features.keys())})') from None
    class_names = None
    if self.caption_template:
      class_names = tf.constant(feature(features, self.label_key or 'label').names)
    template_head, _, template_tail = self.caption_template.partition('{}')
    decoders: Any = tfds.decode.SkipDecoding()   # keep the image encoded: we decode and crop
    for part in reversed(image_key.split('/')):
      decoders = {part: decoders}

    def to_sample(example: dict[str, Any]) -> dict[str, tf.Tensor]:
      label = (tf.cast(feature(example, self.label_key), tf.int64) if self.label_key
               else tf.constant(-1, tf.int64))
      if caption_key:
        captions = tf.reshape(feature(example, caption_key), [-1])
      elif class_names is not None:
        name = tf.gather(class_names, feature(example, self.label_key or 'label'))
        captions = tf.reshape(tf.strings.join([template_head, name, template_tail]), [1])
      else:
        captions = tf.constant([''])
      return {'image': feature(example, image_key), 'captions': captions, 'label': label}

    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(shuffle_seed=0,
                                                             interleave_cycle_length=1))
    return dataset.map(to_sample), int(builder.info.splits[split].num_examples)


def iterate_captions(source: Source, max_count: int = 0) -> Iterator[str]:
  """The captions of a source, in file order, without decoding images (for tokenizer training)."""
  control = StreamControl()
  if source.kind == 'tfds':
    samples, _ = source.tfds_dataset(0, 1)
  else:
    files = tf.data.Dataset.from_tensor_slices(source.files())
    samples = files.interleave(lambda path: source.read_file(path, control),
                               cycle_length=1).map(source.parse).ignore_errors()
  captions = samples.map(lambda s: s['captions']).unbatch().take(max_count or -1)
  try:
    for caption in control.iterate(captions):
      control.check()
      yield caption.decode('utf-8', errors='replace')
    control.check()
  finally:
    control.finish()
