"""tf.data streams of CLIP batches: the endless, resumable train stream and the eval stream.

Train stream, per host (exact resume by design):
  1. This host's files are `files[process_index::process_count]`. Each epoch permutes
     them with numpy's generator seeded by (seed, epoch) and cuts the permutation into
     *groups* of `cycle_length` files.
  2. A group's files are read interleaved (one record from each in turn) and shuffled
     with a buffer whose seed is a function of (seed, epoch, group). Groups follow one
     another (the next one is opened and its buffer filled in the background).
  3. Every raw record is tagged with its position (epoch, group, offset in the group's
     shuffled order) and a running raw count; its random crop and caption choice use
     stateless seeds derived from the position.
  4. Decode + crop + normalise run in parallel (order kept); records that fail to parse
     or decode, and samples with no caption (or no label when labels are asked for),
     are dropped. Skipped = raw records read - samples emitted, exactly.
  5. Batch (per-host size), tokenise the captions (numpy tokenizer via
     `tf.numpy_function`, one call per batch; a stage's shorter text length truncates
     them as OpenAI's tokenizer would, end-of-text last), prefetch.
Shards are read by Python generators (clip_jax.data.sources), so a stream is ended
through its StreamControl, never just dropped; TrainIterator and EvalIterator do that.
The iterator's state is the position after the last sample of the last batch returned
(`{epoch, group, offset, raw_seen, emitted}`, plus a fingerprint of what defines the
order). Restoring rebuilds the stream at (epoch, group) and skips `offset` raw records
of that group before decoding: the next batches are exactly those an uninterrupted
stream would have produced, at the cost of re-reading at most one group of files.
The position does not depend on the image size or text length: a stage of
config.train.stages that changes them rebuilds the stream from the position it reached.

Eval stream: the examples are numbered in file order (TFDS: split order) and every host
reads them forward, decoding only its own share; the share, the decoder and the crop are
those of every evaluation set (`clip_jax.data.eval_input`: open_clip's eval transform in
PIL, contiguous parts of each global batch, masked padding). An example that cannot be
parsed or decoded keeps its place, masked, and is named in `skipped`. The examples are
counted once per process (`count_examples`), and not past `max_examples`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tensorflow as tf

from clip_jax import storage
from clip_jax.data import preprocess
from clip_jax.data.eval_input import NO_LABEL, decode_images, host_ranges, split_batches
from clip_jax.data.sources import Source, StreamControl, describe_first_record, host_files
from clip_jax.data.tokenizers import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
STATE_VERSION = 1
_POSITION_KEYS = ('_epoch', '_group', '_offset', '_raw_index')
# Where a record came from and why it was skipped: used for the skip log, then dropped.
_ORIGIN_KEYS = ('_file', '_record', '_sample', '_problem')
# Samples the next group fills its shuffle buffer with while the current one is read.
_GROUP_READAHEAD = 1


def initial_state() -> dict[str, int]:
  """The position of a stream that has not started."""
  return dict(epoch=0, group=0, offset=0, raw_seen=0, emitted=0)


def _file_groups(num_files: int, seed: int, cycle_length: int, start_epoch: int,
                 start_group: int, start_offset: int, control: StreamControl
                 ) -> Iterator[tuple]:
  """(epoch, group, file indices, shuffle seed, crop key, raw records to skip), until stopped."""
  epoch, first_group, skip = start_epoch, start_group, start_offset
  while not control.stopped:
    order = np.random.default_rng([seed, epoch]).permutation(num_files)
    groups = [order[i:i + cycle_length] for i in range(0, num_files, cycle_length)]
    for group in range(first_group, len(groups)):
      if control.stopped:
        return
      keys = np.random.default_rng([seed, epoch, group]).integers(0, 2**62, size=3)
      yield (np.int64(epoch), np.int64(group), groups[group].astype(np.int64), keys[0],
             keys[1:], np.int64(skip))
      skip = 0
    epoch, first_group = epoch + 1, 0


def _choose_caption(captions: tf.Tensor, seed: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
  """A random non-empty caption (the first one when `seed` is None) and whether there was one."""
  captions = tf.reshape(captions, [-1])
  captions = tf.boolean_mask(captions, tf.strings.length(tf.strings.strip(captions)) > 0)
  count = tf.size(captions)
  if seed is None:
    index = tf.constant(0)
  else:
    index = tf.random.stateless_uniform([], seed, 0, tf.maximum(count, 1), tf.int32)
  padded = tf.concat([captions, tf.constant([''])], axis=0)
  return tf.gather(padded, index), count > 0


def truncate_tokens(tokens: np.ndarray, length: int, eot_token_id: int) -> np.ndarray:
  """Token rows [N, context] -> [N, length], as the tokenizer would have made them with a
  context of `length` (OpenAI's truncate=True): a row whose end-of-text token lies beyond
  keeps its first length - 1 ids and ends with end-of-text."""
  out = np.array(tokens[:, :length], np.int32)
  out[~(out == eot_token_id).any(axis=1), -1] = eot_token_id
  return out


def _tokenize_batch(batch: dict[str, tf.Tensor], tokenizer: Tokenizer, batch_size: int,
                    text_length: int) -> dict[str, tf.Tensor]:
  batch = dict(batch)
  text = tf.numpy_function(
      lambda captions: truncate_tokens(tokenizer(captions), text_length,
                                       tokenizer.eot_token_id),
      [batch.pop('caption')], tf.int32, stateful=False)
  text.set_shape([batch_size, text_length])
  batch['text'] = text
  return batch


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _fingerprint(source: Source, files: list[str], seed: int, process_index: int,
                 process_count: int, shuffle_buffer: int, cycle_length: int) -> str:
  """What defines the order of a host's raw records; a restored state must match it."""
  described = json.dumps(dict(kind=source.kind, files=files, tfds=[source.tfds_name,
                                                                    source.tfds_split],
                              seed=seed, process=[process_index, process_count],
                              shuffle_buffer=shuffle_buffer, cycle_length=cycle_length))
  return hashlib.sha256(described.encode()).hexdigest()[:16]


def train_dataset(source: Source, *, batch_size: int, image_size: int, tokenizer: Tokenizer,
                  seed: int = 0, process_index: int = 0, process_count: int = 1,
                  state: Mapping[str, int] | None = None, crop: str = 'square',
                  crop_scale: tuple[float, float] = (0.9, 1.0),
                  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  resize_method: str = 'bicubic', shuffle_buffer: int = 10_000,
                  cycle_length: int = 16, num_parallel_calls: int = -1,
                  prefetch: int = 2, control: StreamControl | None = None,
                  text_length: int | None = None) -> tf.data.Dataset:
  """The endless train stream of one host, from `state` (see the module docstring).

  `image_size`: the side every random crop is resized to; `text_length`: token rows
  are truncated to it (None: the tokenizer's context length).

  Storage errors of its readers are recorded in `control`, which also ends the stream:
  iterate it with `control.iterate(dataset)` and end it with `control.finish()` (an
  iterator of it must not simply be dropped, see StreamControl).

  Batches are dicts of `image` float32 [B, S, S, 3], `text` int32 [B, L], `label`
  int32 [B] when `source.label_key` is set, and position columns `_epoch`, `_group`,
  `_offset`, `_raw_index` (int64 [B]) that TrainIterator turns into its state.
  """
  state = dict(initial_state(), **(state or {}))
  control = control if control is not None else StreamControl()
  text_length = tokenizer.context_length if text_length is None else int(text_length)
  if not 2 <= text_length <= tokenizer.context_length:
    raise ValueError(f'train_dataset: text_length {text_length} is outside [2, the '
                     f"tokenizer's context length {tokenizer.context_length}]")
  parallel = AUTOTUNE if num_parallel_calls < 0 else num_parallel_calls
  with_label = bool(source.label_key)
  # Every raw record travels with its file and its index there, so that a skipped
  # sample can be named (see `_decode_or_skip`).
  if source.kind == 'tfds':
    host_split, _ = source.tfds_dataset(process_index, process_count)
    num_files = 1
    where = f'TFDS {source.tfds_name}:{source.tfds_split}'
    # One "file": the host's split.
    read_group = lambda file_indices: host_split.enumerate().map(  # noqa: E731
        lambda index, example: (example, where, index))
  else:
    files = host_files(source.files(), process_index, process_count, f'{source.name}.pattern')
    num_files = len(files)
    file_names = tf.constant(files)

    def read_file(path: tf.Tensor) -> tf.data.Dataset:
      return source.read_file(path, control).enumerate().map(
          lambda index, raw: (raw, path, index))

    def read_group(file_indices: tf.Tensor) -> tf.data.Dataset:
      names = tf.data.Dataset.from_tensor_slices(tf.gather(file_names, file_indices))
      return names.interleave(read_file, cycle_length=cycle_length, block_length=1,
                              num_parallel_calls=min(cycle_length, 16), deterministic=True)

  groups = tf.data.Dataset.from_generator(
      lambda: _file_groups(num_files, seed, cycle_length, state['epoch'], state['group'],
                           state['offset'], control),
      output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64),
                        tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64),
                        tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.int64)))

  def group_stream(epoch, group, file_indices, shuffle_seed, crop_key, skip):
    records = read_group(file_indices)
    if shuffle_buffer > 1:
      records = records.shuffle(shuffle_buffer, seed=shuffle_seed)
    # Once stopped, a group ends here: its shuffle buffer is not decoded on the way out.
    records = records.take_while(control.keep_going)
    return records.enumerate().skip(skip).map(
        lambda offset, record: dict(raw=record[0], _file=record[1], _record=record[2],
                                    _epoch=epoch, _group=group, _offset=offset, _key=crop_key))

  raw = groups.interleave(group_stream, cycle_length=1, block_length=1,
                          num_parallel_calls=_GROUP_READAHEAD, deterministic=True)
  raw = raw.enumerate(start=state['raw_seen']).map(lambda index, x: dict(x, _raw_index=index))

  def decode(element: dict[str, Any]) -> dict[str, tf.Tensor]:
    element = dict(element)
    sample = source.parse(element.pop('raw'))
    key = tf.random.experimental.stateless_fold_in(element.pop('_key'), element['_offset'])
    crop_seed, caption_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    caption, has_caption = _choose_caption(sample['captions'], caption_seed)
    image = preprocess.decode_random_crop(sample['image'], crop_seed, image_size, crop=crop,
                                          scale=crop_scale, ratio=crop_ratio, method=resize_method)
    problem = tf.where(has_caption, '', 'no caption')
    out = dict(element, image=preprocess.normalize(image), caption=caption,
               _sample=sample['key'])
    if with_label:
      out['label'] = tf.cast(sample['label'], tf.int32)
      problem = tf.where((sample['label'] < 0) & has_caption, 'no label', problem)
    return dict(out, _problem=problem)

  def undecodable(element: dict[str, Any]) -> dict[str, tf.Tensor]:
    # Same structure as `decode`'s output; the sample id, if the record still parses.
    sample_id = tf.data.Dataset.from_tensors(element['raw']).map(
        lambda *raw: source.parse(*raw)['key']).ignore_errors().concatenate(
            tf.data.Dataset.from_tensors(tf.constant(''))).take(1).get_single_element()
    out = {k: v for k, v in element.items() if k not in ('raw', '_key')}
    out.update(image=tf.zeros([image_size, image_size, 3]), caption=tf.constant(''),
               _sample=sample_id, _problem=tf.constant('undecodable image or record'))
    if with_label:
      out['label'] = tf.constant(-1, tf.int32)
    return out

  def decode_or_skip(element: dict[str, Any]) -> tf.data.Dataset:
    # A record whose parse or decode fails would vanish in ignore_errors without a trace;
    # the fallback element keeps its file and index for the log (and is then dropped).
    one = tf.data.Dataset.from_tensors(element)
    return one.map(decode).ignore_errors().concatenate(one.map(undecodable)).take(1)

  def log_skipped(sample: dict[str, tf.Tensor]) -> tf.Tensor:
    def note() -> tf.Tensor:
      return tf.numpy_function(control.note_skip, [sample['_file'], sample['_record'],
                                                   sample['_sample'], sample['_problem']],
                               tf.bool, stateful=True)
    return tf.cond(sample['_problem'] == '', lambda: tf.constant(True), note)

  # A reader's storage error reaches here as an element error: it is dropped, and the
  # iterator raises it from the StreamControl instead (see the module docstring).
  samples = raw.ignore_errors().interleave(decode_or_skip, cycle_length=AUTOTUNE,
                                           block_length=1, num_parallel_calls=parallel,
                                           deterministic=True)
  samples = samples.filter(lambda s: log_skipped(s) & (s['_problem'] == '')).map(
      lambda s: {k: v for k, v in s.items() if k not in _ORIGIN_KEYS})
  batches = samples.batch(batch_size, drop_remainder=True)
  batches = batches.map(lambda b: _tokenize_batch(b, tokenizer, batch_size, text_length),
                        num_parallel_calls=parallel, deterministic=True)
  return batches.prefetch(prefetch).with_options(_options())


class TrainIterator:
  """Numpy batches of the train stream with an exact, JSON-serialisable position.

  `state_dict()` after a batch, passed to `restore()` (or to `make_train_iterator(...,
  state=)`), continues with exactly the batch that would have come next.
  `num_skipped` counts the samples dropped so far (corrupt, no caption, ...). A storage
  fault its readers could not get past is raised (StorageError) instead of a batch.
  `close()` ends the stream (also when the iterator is garbage-collected).
  """

  def __init__(self, build: Callable[[Mapping[str, int], StreamControl], tf.data.Dataset],
               fingerprint: str, state: Mapping[str, Any] | None = None,
               process_index: int = 0):
    self._build = build
    self._control: StreamControl | None = None
    self._fingerprint = fingerprint
    self._process_index = process_index
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None
    self.restore(state or initial_state())

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state`: a `state_dict()` of an iterator over the same data, or
    `delivery.all_host_states(...)` of all hosts (this host's entry is used)."""
    if 'hosts' in state:
      hosts = state['hosts']
      if str(self._process_index) not in hosts:
        raise ValueError(f'data iterator state: no entry for host {self._process_index} (saved '
                         f'for hosts {", ".join(sorted(hosts))}); resume with as many hosts')
      state = hosts[str(self._process_index)]
    # initial_state() carries neither a version nor a fingerprint; a saved state has both.
    version = state.get('version', STATE_VERSION)
    if version != STATE_VERSION:
      raise ValueError(f'data iterator state (the data position saved with the checkpoint): '
                       f'format version {version}, but this clip_jax reads version '
                       f'{STATE_VERSION}; resume with the clip_jax that wrote it, or start '
                       'the data stream afresh from a new workdir')
    saved = state.get('fingerprint', self._fingerprint)
    if saved != self._fingerprint:
      raise ValueError('data iterator state: it was saved for another file list, seed, host '
                       'layout, shuffle_buffer or cycle_length (fingerprint '
                       f'{saved} != {self._fingerprint}); resume with the same config.data, '
                       'config.seed and number of hosts')
    self._position = {k: int(state.get(k, 0)) for k in initial_state()}
    self.close()   # the next batch comes from a stream built lazily at the new position

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._control = StreamControl()
      self._iterator = self._control.iterate(self._build(self._position, self._control))
    try:
      batch = next(self._iterator)
    finally:
      # A batch completed after a reader gave up may lack that reader's samples.
      self._control.check()
    last = {k: int(batch[k][-1]) for k in _POSITION_KEYS}
    self._position = dict(epoch=last['_epoch'], group=last['_group'], offset=last['_offset'] + 1,
                          raw_seen=last['_raw_index'] + 1,
                          emitted=self._position['emitted'] + len(batch['_epoch']))
    return {k: v for k, v in batch.items() if not k.startswith('_')}

  @property
  def num_skipped(self) -> int:
    """Raw records read so far that did not become a sample."""
    return self._position['raw_seen'] - self._position['emitted']

  def state_dict(self) -> dict[str, Any]:
    return dict(self._position, version=STATE_VERSION, fingerprint=self._fingerprint)

  def close(self) -> None:
    """Ends the stream's readers (the position is kept: the next batch restarts there)."""
    control = getattr(self, '_control', None)
    self._iterator = self._control = None
    if control is not None:
      control.finish()

  def __del__(self):
    self.close()


def check_readable(source: Source, process_index: int, process_count: int) -> None:
  """Fails with the source's name if this host's data holds no decodable sample at all
  (an endless stream would otherwise wait forever); the error lists what the first
  record holds and the keys that choose the image and caption."""
  control = StreamControl()
  if source.kind == 'tfds':
    samples, _ = source.tfds_dataset(process_index, process_count)
    where = f'TFDS {source.tfds_name}:{source.tfds_split}'
  else:
    files = host_files(source.files(), process_index, process_count, f'{source.name}.pattern')
    samples = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda path: source.read_file(path, control), cycle_length=1).map(source.parse)
    where = f'{len(files)} file(s) of host {process_index} ({", ".join(files[:3])}' + (
        ', ...)' if len(files) > 3 else ')')

  def usable(sample: dict[str, tf.Tensor]) -> tf.Tensor:
    # The training decoder, at a small size; the pixels are used so that the decode is
    # not pruned from the graph.
    pixels = preprocess.decode_random_crop(sample['image'], tf.constant([0, 0]), 8,
                                           method='bilinear')
    ok = _choose_caption(sample['captions'], None)[1] & tf.reduce_all(tf.math.is_finite(pixels))
    return ok & (sample['label'] >= 0) if source.label_key else ok

  # take(1) ends the stream inside tf.data, readers included (see StreamControl).
  found = list(samples.ignore_errors().map(usable).ignore_errors().filter(
      lambda ok: ok).take(1).as_numpy_iterator())
  control.check()
  if not found:
    hint = ''
    if source.kind != 'tfds':
      hint = (f'; the first record of {files[0]} has {describe_first_record(source, files[0])}; '
              f'{source.name}.image_key / caption_key{" / label_key" if source.label_key else ""}'
              f' name the features to read (now {source.images!r} / {source.captions!r}'
              f'{f" / {source.label_key!r}" if source.label_key else ""}; source '
              f'{source.kind!r}: {source.name}.source)')
    raise ValueError(f'{source.name}: no readable sample (decodable image with a caption'
                     f'{" and a label" if source.label_key else ""}) in {where}{hint}')


def read_policy(data: Mapping[str, Any]) -> storage.RetryPolicy:
  """config.data.read_attempts / read_retry_seconds as the shard readers' retry policy."""
  attempts, delay = data['read_attempts'], data['read_retry_seconds']
  if not isinstance(attempts, int) or attempts < 1:
    raise ValueError(f'config.data.read_attempts: expected an integer >= 1, got {attempts!r}')
  if not isinstance(delay, (int, float)) or delay < 0:
    raise ValueError(f'config.data.read_retry_seconds: expected a number >= 0, got {delay!r}')
  return storage.RetryPolicy(attempts=attempts, delay=float(delay),
                             max_delay=max(float(delay), 60.0))


def _data_options(data: Mapping[str, Any]) -> dict[str, Any]:
  """config.data keys -> train_dataset keyword arguments (with the key names in errors)."""
  if data['crop'] not in preprocess.TRAIN_CROPS:
    raise ValueError(f'config.data.crop: {data["crop"]!r}; expected one of '
                     f'{", ".join(preprocess.TRAIN_CROPS)}')
  if data['resize_method'] not in preprocess.RESIZE_METHODS:
    raise ValueError(f'config.data.resize_method: {data["resize_method"]!r}; expected one of '
                     f'{", ".join(preprocess.RESIZE_METHODS)}')
  return dict(crop=data['crop'], crop_scale=tuple(data['crop_scale']),
              crop_ratio=tuple(data['crop_ratio']), resize_method=data['resize_method'],
              shuffle_buffer=int(data['shuffle_buffer']), cycle_length=int(data['cycle_length']),
              num_parallel_calls=int(data['num_parallel_calls']), prefetch=int(data['prefetch']))


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def check_train_source(config: Any, process_index: int | None = None,
                       process_count: int | None = None) -> None:
  """config.data.train names files (or a TFDS split) of which this host's share holds a
  decodable sample; the error names the key to change."""
  process_index, process_count = _processes(process_index, process_count)
  source = Source.from_config(config.data.train, 'config.data.train', read_policy(config.data))
  check_readable(source, process_index, process_count)


def make_train_iterator(config: Any, tokenizer: Tokenizer | None = None, *,
                        process_index: int | None = None, process_count: int | None = None,
                        state: Mapping[str, Any] | None = None, image_size: int | None = None,
                        text_length: int | None = None, check: bool = True) -> TrainIterator:
  """This host's train iterator from the experiment config (config.data, config.seed,
  config.batch_size = global batch, config.model.vision.image_size).

  `image_size` / `text_length`: a stage's (config.train.stages) instead of the model's;
  the order of the samples does not depend on them, so an iterator built at another
  stage's settings from `state` goes on with exactly the next samples.
  `process_index` / `process_count` default to jax's; tests pass them to act as hosts.
  `check`: first make sure this host's share has a readable sample (`check_readable`;
  the trainer's preflight has done so already).
  """
  process_index, process_count = _processes(process_index, process_count)
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size: {config.batch_size} is not divisible by the '
                     f'{process_count} hosts')
  source = Source.from_config(config.data.train, 'config.data.train', read_policy(config.data))
  tokenizer = tokenizer or get_tokenizer(config.data.tokenizer)
  options = _data_options(config.data)
  files = [] if source.kind == 'tfds' else host_files(
      source.files(), process_index, process_count, 'config.data.train.pattern')
  if check:
    check_readable(source, process_index, process_count)
  fingerprint = _fingerprint(source, files, int(config.seed), process_index, process_count,
                             options['shuffle_buffer'], options['cycle_length'])
  image_size = int(config.model.vision.image_size if image_size is None else image_size)
  build = lambda position, control: train_dataset(  # noqa: E731
      source, batch_size=config.batch_size // process_count, image_size=image_size,
      tokenizer=tokenizer, seed=int(config.seed), process_index=process_index,
      process_count=process_count, state=position, control=control,
      text_length=text_length, **options)
  return TrainIterator(build, fingerprint, state, process_index)


# Records counted per eval source in this process: (kind, files, keys) -> (count, whether
# that is all of them). A second evaluation does not read the files again; files rewritten
# under the same names keep their first count while the process lives.
_RECORD_COUNTS: dict[tuple, tuple[int, bool]] = {}


def count_examples(source: Source, max_examples: int = 0) -> int:
  """Examples of an eval source, at most `max_examples` (0: all of them).

  A TFDS split's size is in its metadata; files are read (several at once) until
  `max_examples` records, once per process and source.
  """
  if source.kind == 'tfds':
    total = source.tfds_num_examples()
    return min(total, max_examples) if max_examples else total
  files = source.files()
  key = (source.kind, tuple(files), source.images, source.captions, source.label_key)
  counted, complete = _RECORD_COUNTS.get(key, (0, False))
  if not complete and (not max_examples or counted < max_examples):
    control = StreamControl()
    records = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda path: source.read_file(path, control), cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE, deterministic=False)
    # A storage fault is raised by `check` below; take() ends the readers inside tf.data.
    records = records.ignore_errors().take(max_examples or -1)
    try:
      counted = int(records.reduce(np.int64(0), lambda count, *_: count + 1))
    finally:
      control.finish()
    control.check()
    complete = not max_examples or counted < max_examples
    _RECORD_COUNTS[key] = (counted, complete)
  return min(counted, max_examples) if max_examples else counted


def _eval_records(source: Source, count: int, control: StreamControl) -> tf.data.Dataset:
  """The first `count` examples of a source in order: {'index', 'image' (encoded),
  'caption' (the first non-empty one, or ''), 'label', 'key'}. A record that cannot be
  parsed is missing (its index is skipped)."""
  if source.kind == 'tfds':
    raw, _ = source.tfds_dataset(0, 1)   # the whole split: hosts keep their share later
  else:
    raw = tf.data.Dataset.from_tensor_slices(source.files()).interleave(
        lambda path: source.read_file(path, control), cycle_length=1)

  def fields(index: tf.Tensor, element: Any) -> dict[str, tf.Tensor]:
    sample = source.parse(element)
    caption, _ = _choose_caption(sample['captions'], None)
    return dict(index=index, image=sample['image'], caption=caption,
                label=tf.cast(sample['label'], tf.int32), key=sample['key'])

  records = raw.take(count).enumerate().map(fields, num_parallel_calls=AUTOTUNE,
                                            deterministic=True).ignore_errors()
  return records.take_while(control.keep_going).prefetch(AUTOTUNE).with_options(_options())


class _ForwardReader:
  """Examples of a stream by index, read forward: `read(indices)` takes ascending ranges;
  the examples before a range (other hosts') are passed over undecoded, and None stands
  for one that is missing."""

  def __init__(self, elements: Iterator[dict[str, Any]]):
    self._elements = elements
    self._next: dict[str, Any] | None = None

  def read(self, indices: np.ndarray) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = [None] * len(indices)
    if not len(indices):
      return out
    lo, hi = int(indices[0]), int(indices[-1]) + 1
    while True:
      if self._next is None:
        self._next = next(self._elements, None)
        if self._next is None:
          return out
      index = int(self._next['index'])
      if index >= hi:
        return out
      if index >= lo:
        out[index - lo] = self._next
      self._next = None


class EvalIterator:
  """This host's eval batches of a TFRecord, tar or TFDS source; `len()` is the same on
  every host.

  Batches: `image`, `mask` (False on padding and on examples that could not be read),
  `index` (the example's position in the source), `label` (NO_LABEL where masked) when
  `source.label_key` is set, `text` (the first caption, tokenised) when a tokenizer is
  given. After a pass, `skipped` names this host's unreadable examples. A storage fault
  is raised (StorageError); leaving a loop early ends the readers properly.
  """

  def __init__(self, source: Source, *, batch_size: int, image_size: int,
               tokenizer: Tokenizer | None, process_index: int, process_count: int,
               max_examples: int = 0):
    self.num_examples = count_examples(source, max_examples)
    if self.num_examples == 0:
      raise ValueError(f'{source.name}: no example to evaluate')
    self._source, self._image_size, self._tokenizer = source, image_size, tokenizer
    self._split = (batch_size, process_index, process_count)
    ranges = host_ranges(self.num_examples, *self._split)
    self.num_batches = len(ranges)
    self.host_count = sum(len(r) for r in ranges)   # examples this host reads
    self.skipped: list[str] = []

  def __len__(self) -> int:
    return self.num_batches

  def _rows(self, examples: _ForwardReader, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = examples.read(indices)
    images, problems = decode_images([None if r is None else r['image'] for r in records],
                                     self._image_size)
    for index, record, problem in zip(indices, records, problems):
      if problem:
        key = record['key'].decode('utf-8', 'replace') if record is not None else ''
        self.skipped.append(f'{self._source.name}: example {index}'
                            f'{f" ({key})" if key else ""}: {problem}')
    mask = np.array([p is None for p in problems], bool)
    rows = {'image': images, 'mask': mask, 'index': indices.astype(np.int32)}
    if self._source.label_key:
      labels = [NO_LABEL if r is None else int(r['label']) for r in records]
      rows['label'] = np.where(mask, np.array(labels, np.int32), NO_LABEL).astype(np.int32)
    if self._tokenizer is not None:
      captions = ['' if r is None else r['caption'].decode('utf-8', 'replace') for r in records]
      # Zero captions still need the tokenizer's row shape (a host past the end).
      rows['text'] = np.asarray(self._tokenizer(captions or ['']), np.int32)[:len(captions)]
    return rows

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self.skipped = []
    control = StreamControl()
    examples = _ForwardReader(control.iterate(_eval_records(self._source, self.num_examples,
                                                            control)))
    try:
      for batch in split_batches(self.num_examples, self._split[0],
                                 lambda indices: self._rows(examples, indices), *self._split[1:]):
        control.check()
        yield batch
      control.check()
    finally:
      control.finish()

  @property
  def num_skipped(self) -> int:
    """This host's examples that could not be read (after a pass)."""
    return len(self.skipped)


def make_eval_iterator(source: Source | Mapping[str, Any], *, batch_size: int, image_size: int,
                       tokenizer: Tokenizer | None = None, process_index: int | None = None,
                       process_count: int | None = None, max_examples: int = 0) -> EvalIterator:
  """Eval batches of this host (`batch_size` per host) from a Source or a config section
  with the keys of config.data.train; the first `max_examples` examples (0: all)."""
  if not isinstance(source, Source):
    source = Source.from_config(source, 'eval source')
  process_index, process_count = _processes(process_index, process_count)
  return EvalIterator(source, batch_size=batch_size, image_size=image_size, tokenizer=tokenizer,
                      process_index=process_index, process_count=process_count,
                      max_examples=max_examples)
