"""The one path layer: every file a user names is read and written here, through etils.epath.

Users give local paths (relative or absolute, `~` allowed) or URLs (`gs://bucket/run`, and
the other schemes epath knows: `s3://`, `az://`). `resolve` makes a local path absolute,
once, where it comes in (the CLIs, `train_and_evaluate`, `clip_jax.load`, the public
functions of `checkpoint` and `convert`), and leaves a URL exactly as given: `os.path`
never touches one. The rest of clip_jax calls the functions below instead of `open()`,
`os.makedirs` or `os.path.*`, so a run behaves the same in `./workdir`, `/data/run` and
`gs://bucket/run` (tests/test_gcs.py runs it all against a GCS emulator; a test greps the
package for file calls that bypass this module).

Backends and credentials:
- URLs go to epath's fsspec backend (gcsfs for `gs://`), not to its TensorFlow one:
  tensorflow is imported only under `clip_jax/data/` (accelerator images may lack it), and
  TensorFlow's GCS client cannot be pointed at anything but Google's servers, so it could
  not be tested here. gcsfs finds credentials as every Google client does (application
  default credentials: `GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth application-default
  login`, or the TPU/GCE VM's service account). Setting `EPATH_USE_TF` yourself wins.
- orbax writes the checkpoint arrays with tensorstore's own GCS driver (same credentials);
  TensorBoard event files are written by tensorboardX (google-cloud-storage, same again).
- Object stores have no append and no rename: `append_text` rewrites the object (it is
  meant for logs of a few MB), and a single object upload is already atomic.

Training data is read through `RetryingReader`: a failed read (connection reset, HTTP 5xx
after the client's own retries, an object that vanished) is retried from the same byte
offset with exponential backoff, then raises `StorageError` naming the file and the offset.
A storage fault is never mistaken for a corrupt sample (see clip_jax/data/sources.py).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import glob as local_glob
import io
import logging
import os
import tempfile
import threading
import uuid
from typing import IO, Any, Callable, Iterator, TypeVar

# Before etils decides on a backend (it caches the choice on first use): see above.
os.environ.setdefault('EPATH_USE_TF', 'false')

from etils import epath  # noqa: E402  pylint: disable=wrong-import-position

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
T = TypeVar('T')


def is_url(path: PathLike) -> bool:
  """`gs://...`, `s3://...`: a path no `os.path` function may touch."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """The path as epath.Path: local ones absolute (from the current directory), URLs as given."""
  text = os.fspath(path)
  if not text:
    raise ValueError('empty path')
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(base: PathLike, *parts: str) -> epath.Path:
  return resolve(base).joinpath(*parts)


def name(path: PathLike) -> str:
  """The last component ('' for a bucket root), ignoring a trailing slash."""
  return resolve(os.fspath(path).rstrip('/') or '/').name


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


def is_dir(path: PathLike) -> bool:
  return resolve(path).is_dir()


def is_file(path: PathLike) -> bool:
  path = resolve(path)
  return path.exists() and not path.is_dir()


def makedirs(path: PathLike) -> epath.Path:
  path = resolve(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def open(path: PathLike, mode: str = 'rb') -> IO[Any]:  # pylint: disable=redefined-builtin
  """A file object; for writing prefer `atomic_write` (no half-written files)."""
  if 'w' in mode or 'a' in mode:
    resolve(path).parent.mkdir(parents=True, exist_ok=True)
  return resolve(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
  return resolve(path).read_bytes()


def read_text(path: PathLike) -> str:
  return resolve(path).read_text(encoding='utf-8')


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[bytes]]:
  """A binary file that appears at `path` whole or not at all.

  Locally it is written beside the target and renamed over it. On an object store an
  upload becomes visible only once it completes; if the block fails, the upload is
  cancelled instead of completed.
  """
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    f = path.open('wb')
    try:
      yield f
    except BaseException:
      discard = getattr(f, 'discard', None)   # fsspec: cancel the upload
      if discard is not None:
        with contextlib.suppress(Exception):
          discard()
      f.closed = True                         # and never complete it (close or GC would)
      raise
    f.close()
    return
  # Not mkstemp: its files are private (0600); this one gets the umask's permissions.
  tmp = os.path.join(os.fspath(path.parent), f'.{path.name}.{uuid.uuid4().hex[:12]}.tmp')
  try:
    with builtins.open(tmp, 'xb') as f:
      yield f
    os.replace(tmp, os.fspath(path))
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  with atomic_write(path) as f:
    f.write(data)
  return resolve(path)


def write_text(path: PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode('utf-8'))


def append_text(path: PathLike, text: str) -> epath.Path:
  """Appends to a text file; on an object store the object is read and rewritten."""
  path = resolve(path)
  if is_url(path):
    previous = path.read_text(encoding='utf-8') if path.exists() else ''
    return write_text(path, previous + text)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('a') as f:
    f.write(text)
  return path


class TextLog:
  """A text file that grows line by line (metrics.jsonl): appends locally; on an object
  store it keeps the content and uploads it whole on each write (no append there)."""

  def __init__(self, path: PathLike):
    self.path = resolve(path)
    self._remote = is_url(self.path)
    self._content = ''
    if self._remote and self.path.exists():
      self._content = self.path.read_text(encoding='utf-8')

  def write(self, text: str) -> None:
    if self._remote:
      self._content += text
      write_text(self.path, self._content)
    else:
      append_text(self.path, text)


def _fsspec(path: PathLike) -> tuple[Any, str]:
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.core.url_to_fs(os.fspath(path))


def glob(pattern: PathLike) -> list[str]:
  """Sorted paths matching a glob (`*`, `?`, `[...]`); local results are absolute."""
  text = os.fspath(pattern)
  if not is_url(text):
    return sorted(local_glob.glob(os.path.abspath(os.path.expanduser(text))))
  fs, _ = _fsspec(text)
  protocol = text.split('://', 1)[0] + '://'
  return sorted(protocol + p for p in fs.glob(text))


def list_files(folder: PathLike) -> list[str]:
  """Paths of every file under `folder`, recursively, relative to it and sorted."""
  folder = resolve(folder)
  if not is_url(folder):
    root_dir = os.fspath(folder)
    return sorted(os.path.relpath(os.path.join(root, f), root_dir).replace(os.sep, '/')
                  for root, _, files in os.walk(root_dir) for f in files)
  fs, root = _fsspec(os.fspath(folder))
  root = root.rstrip('/') + '/'
  return sorted(p[len(root):] for p in fs.find(root) if p.startswith(root))


def size(path: PathLike) -> int:
  return int(resolve(path).stat().length)


def copy_tree(source: PathLike, destination: PathLike) -> list[epath.Path]:
  """Copies every file under the local or remote folder `source` into `destination`."""
  written = []
  for relative in list_files(source):
    written.append(write_bytes(join(destination, relative), read_bytes(join(source, relative))))
  return written


@contextlib.contextmanager
def local_dir(path: PathLike) -> Iterator[str]:
  """A local directory that becomes `path`: `path` itself when local, else a temporary one
  copied up on exit. For libraries that can only write local files (the JAX profiler,
  SentencePiece's trainer)."""
  path = resolve(path)
  if not is_url(path):
    path.mkdir(parents=True, exist_ok=True)
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix='clip_jax_') as tmp:
    yield tmp
    copy_tree(tmp, path)


def map_bytes(path: PathLike) -> Any:
  """The file's bytes as a uint8 numpy array: memory-mapped when local (weight files of
  gigabytes are not read whole), downloaded when remote."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  path = resolve(path)
  if is_url(path):
    return np.frombuffer(path.read_bytes(), np.uint8)
  if path.stat().length == 0:
    return np.zeros(0, np.uint8)
  return np.memmap(os.fspath(path), dtype=np.uint8, mode='r')


def readable(path: PathLike) -> str | io.BytesIO:
  """What libraries that take a file name or a seekable file get: the name of a local file,
  or the whole of a remote one in memory (random access over HTTP would be slow)."""
  path = resolve(path)
  return io.BytesIO(path.read_bytes()) if is_url(path) else os.fspath(path)


# --- reading data that must not be lost ---------------------------------------------------

class StorageError(OSError):
  """A read that kept failing: names the file and the byte offset. Not a data error."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """`attempts` tries per read; waits of `delay` s, doubling, at most `max_delay` s."""
  attempts: int = 6
  delay: float = 1.0
  max_delay: float = 60.0

  def __post_init__(self):
    if self.attempts < 1 or self.delay < 0 or self.max_delay < self.delay:
      raise ValueError(f'read retries: expected attempts >= 1 and 0 <= delay <= max_delay, '
                       f'got {self}')


def with_retries(action: Callable[[], T], policy: RetryPolicy, describe: Callable[[], str],
                 on_failure: Callable[[], None] = lambda: None,
                 retry_if: Callable[[BaseException], bool] = lambda error: True,
                 cancel: threading.Event | None = None) -> T:
  """`action()`, retried by `policy` on exceptions that `retry_if` accepts (others pass
  through); when the attempts are spent, StorageError(describe() ...). Setting `cancel`
  ends the waiting and the retrying at once (a stream being shut down)."""
  import tenacity  # pylint: disable=import-outside-toplevel
  cancel = cancel or threading.Event()

  def warn(state: tenacity.RetryCallState) -> None:
    on_failure()
    logger.warning('%s failed (%s: %s); attempt %d of %d in %.1fs', describe(),
                   type(state.outcome.exception()).__name__, state.outcome.exception(),
                   state.attempt_number + 1, policy.attempts, state.next_action.sleep)

  retrying = tenacity.Retrying(
      stop=tenacity.stop_any(tenacity.stop_after_attempt(policy.attempts),
                             lambda state: cancel.is_set()),
      wait=tenacity.wait_exponential(multiplier=policy.delay, min=policy.delay,
                                     max=policy.max_delay),
      retry=tenacity.retry_if_exception(
          lambda error: isinstance(error, Exception) and retry_if(error)),
      before_sleep=warn, reraise=False, sleep=cancel.wait)
  try:
    return retrying(action)
  except tenacity.RetryError as error:
    on_failure()
    cause = error.last_attempt.exception()
    tries = error.last_attempt.attempt_number
    raise StorageError(f'{describe()} failed {tries} time(s), last with '
                       f'{type(cause).__name__}: {cause}' + ('' if tries == policy.attempts
                                                            else ' (cancelled)')) from cause


# Bytes asked for per read: on an object store each read is one ranged GET.
READ_BYTES_LOCAL = 1 << 20
READ_BYTES_REMOTE = 8 << 20


class RetryingReader(io.RawIOBase):
  """A read-only stream over a local or remote file that survives storage faults.

  The file is opened at once: a missing file raises FileNotFoundError (the caller
  decides whether that is an error). Afterwards every failed read closes the file,
  waits, opens it again and seeks back to where it was (`policy`); when the attempts
  are spent it raises StorageError naming the file and the byte offset. Remote files
  are read without the client's own cache: the buffered reader on top asks for
  `read_bytes` at a time, one request each, in order.
  """

  def __init__(self, path: PathLike, policy: RetryPolicy = RetryPolicy(),
               read_bytes: int = READ_BYTES_REMOTE, cancel: threading.Event | None = None):
    super().__init__()
    self.path = resolve(path)
    self.policy = policy
    self._cancel = cancel
    self.offset = 0
    self._read_bytes = int(read_bytes)
    self._file: IO[bytes] | None = None
    # A file that is not there is not retried: it was never there (FileNotFoundError).
    self._file = with_retries(self._open, policy, lambda: f'{self.path}: opening',
                              retry_if=lambda error: not isinstance(error, FileNotFoundError),
                              cancel=cancel)

  def _open(self) -> IO[bytes]:
    if not is_url(self.path):
      return self.path.open('rb')
    fs, _ = _fsspec(self.path)
    extra = {'concurrency': 1} if os.fspath(self.path).startswith('gs://') else {}
    return fs.open(os.fspath(self.path), 'rb', block_size=self._read_bytes, cache_type='none',
                   **extra)

  def readable(self) -> bool:
    return True

  def _drop(self) -> None:
    if self._file is not None:
      with contextlib.suppress(Exception):
        self._file.close()
      self._file = None

  def _read(self, count: int) -> bytes:
    if self._file is None:
      self._file = self._open()
      self._file.seek(self.offset)
    return self._file.read(count)

  def readinto(self, buffer: Any) -> int:
    count = len(buffer)
    data = with_retries(lambda: self._read(count), self.policy,
                        lambda: f'{self.path}: reading {count} bytes at byte {self.offset}',
                        self._drop, cancel=self._cancel)
    buffer[:len(data)] = data
    self.offset += len(data)
    return len(data)

  def close(self) -> None:
    self._drop()
    super().close()


def open_for_reading(path: PathLike, policy: RetryPolicy = RetryPolicy(),
                     cancel: threading.Event | None = None) -> io.BufferedReader:
  """A buffered RetryingReader: reads of 1 MiB locally, 8 MiB from an object store."""
  size = READ_BYTES_REMOTE if is_url(path) else READ_BYTES_LOCAL
  return io.BufferedReader(RetryingReader(path, policy, size, cancel), buffer_size=size)
