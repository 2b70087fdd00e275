"""clip_jax.storage, the one path layer: paths, atomic writes, appends, listing, and that no
module reads or writes a user's file around it."""

import ast
import os
import pathlib
import re

import pytest

from clip_jax import storage

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'clip_jax'

# Calls that would read or write a file around the path layer, and the few places where
# they are right: (module, the call as `ast.unparse` writes it, why).
BYPASS = re.compile(r'^(open|os\.makedirs|os\.path\.(abspath|exists|isfile|isdir|getsize)|'
                    r'os\.(listdir|walk|replace|remove|unlink|scandir|rename)|tf\.io\.gfile\..*|'
                    r'glob\.glob|gzip\.open|np\.(load|save|memmap)|Image\.open|shutil\..*|'
                    r'tf\.(data\.TFRecordDataset|io\.TFRecordWriter)|zipfile\.ZipFile|'
                    r'torch\.(load|save))$')
ALLOWED = [
    ('main.py', 'os.path.abspath(__file__)', 'the package location, not a user path'),
    ('data/tokenizers.py', 'os.path.exists(candidate)',
     'the CLIP BPE file an installed package ships'),
    ('evaluate/zeroshot.py', 'np.load(io.BytesIO(storage.read_bytes(cache_path)))',
     'bytes read through storage'),
    ('evaluate/zeroshot.py', 'np.save(buffer, classifier)', 'into memory, written by storage'),
    ('evaluate/wds.py', 'np.load(io.BytesIO(parts[METADATA_MEMBER]), allow_pickle=False)',
     'a tar member in memory, read through storage'),
    ('embed.py', 'np.save(buffer, embeddings.astype(np.float32))',
     'into memory, written by storage'),
    ('convert/__init__.py',
     'torch.save({k: _numpy_to_torch(v) for k, v in tensors.items()}, buffer)',
     'into memory, written by storage'),
    ('convert/safe_load.py', "torch.load(data, map_location='cpu', weights_only=True)",
     'a file name or bytes from storage.readable'),
    ('convert/safe_load.py', 'zipfile.ZipFile(data)', 'a file name or bytes from storage.readable'),
    ('convert/safe_load.py', 'zipfile.ZipFile(rewound())',
     'a file name or bytes from storage.readable'),
]


def _file_calls(source: str) -> list[tuple[int, str]]:
  """(line, call) of every call in the code whose function BYPASS names; bytes in memory
  (`Image.open(io.BytesIO(...))`) are fine."""
  calls = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call) or not BYPASS.match(ast.unparse(node.func)):
      continue
    first = node.args[0] if node.args else None
    if (isinstance(first, ast.Call) and ast.unparse(first.func) == 'io.BytesIO'
        and ast.unparse(node.func) == 'Image.open'):
      continue
    calls.append((node.lineno, ast.unparse(node)))
  return calls


def _violations():
  found = []
  for path in sorted(PACKAGE.rglob('*.py')):
    relative = path.relative_to(PACKAGE).as_posix()
    if relative == 'storage.py':
      continue
    for line, call in _file_calls(path.read_text()):
      if not any(relative == module and call == allowed for module, allowed, _ in ALLOWED):
        found.append(f'clip_jax/{relative}:{line}: {call}')
  return found


def test_no_module_touches_files_around_the_path_layer():
  assert _violations() == []
  # The check catches what it is for, and not the path layer's own calls.
  for bypass in ("open(path, 'w')", 'os.makedirs(d)', 'os.path.abspath(workdir)', 'np.save(out, x)',
                 'tf.io.gfile.glob(p)', 'Image.open(path)'):
    assert _file_calls(bypass), bypass
  for fine in ('storage.open(path)', 'path.open("rb")', 'Image.open(io.BytesIO(data))'):
    assert not _file_calls(fine), fine


def test_resolve_makes_local_paths_absolute_and_leaves_urls_alone(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.resolve('workdir')) == str(tmp_path / 'workdir')
  assert str(storage.resolve('./a/../b')) == str(tmp_path / 'b')
  assert str(storage.resolve('~/x')) == os.path.expanduser('~/x')
  for url in ('gs://bucket/run', 'gs://bucket/run/', 's3://b/k/x.tar'):
    assert str(storage.resolve(url)) == url.rstrip('/')
  assert str(storage.join('gs://bucket/run', 'checkpoints')) == 'gs://bucket/run/checkpoints'
  assert storage.name('gs://bucket/data/coco/') == 'coco'
  with pytest.raises(ValueError, match='empty path'):
    storage.resolve('')


def test_atomic_writes_appends_listing_and_permissions(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = storage.write_text('out/deep/config.json', '{"a": 1}\n')
  assert path == storage.resolve('out/deep/config.json')
  assert storage.read_text('out/deep/config.json') == '{"a": 1}\n'
  # Written files get the usual permissions (umask), not a temporary file's 0600.
  umask = os.umask(0)
  os.umask(umask)
  assert (tmp_path / 'out/deep/config.json').stat().st_mode & 0o777 == 0o666 & ~umask
  with pytest.raises(RuntimeError):
    with storage.atomic_write('out/partial.bin') as f:
      f.write(b'half')
      raise RuntimeError('interrupted')
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['deep']   # no leftovers

  storage.append_text('log.jsonl', 'one\n')
  log = storage.TextLog('log.jsonl')
  log.write('two\n')
  assert (tmp_path / 'log.jsonl').read_text() == 'one\ntwo\n'

  (tmp_path / 'tree/a/b').mkdir(parents=True)
  for name in ('tree/x.jpg', 'tree/a/y.png', 'tree/a/b/z.txt'):
    (tmp_path / name).write_text(name)
  assert storage.list_files('tree') == ['a/b/z.txt', 'a/y.png', 'x.jpg']
  assert storage.glob('tree/*/*.png') == [str(tmp_path / 'tree/a/y.png')]
  assert storage.is_dir('tree') and storage.is_file('tree/x.jpg') and not storage.is_file('tree')
  assert storage.size('tree/x.jpg') == len('tree/x.jpg')

  with storage.local_dir('made/here') as folder:
    assert folder == str(tmp_path / 'made/here')
  copied = storage.copy_tree('tree', 'copy')
  assert sorted(str(p) for p in copied) == sorted(
      str(tmp_path / 'copy' / n) for n in ('a/b/z.txt', 'a/y.png', 'x.jpg'))


def test_retrying_reader_reads_local_files_and_names_missing_ones(tmp_path):
  data = os.urandom(3_000_000)
  (tmp_path / 'blob').write_bytes(data)
  with storage.open_for_reading(str(tmp_path / 'blob')) as stream:
    assert stream.read(10) == data[:10] and stream.read() == data[10:]
  with pytest.raises(FileNotFoundError):
    storage.open_for_reading(str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='attempts'):
    storage.RetryPolicy(attempts=0)


def test_with_retries_backs_off_then_names_what_failed():
  calls = []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError('reset by peer')
    return 'data'

  policy = storage.RetryPolicy(attempts=3, delay=0.0)
  assert storage.with_retries(flaky, policy, lambda: 'x: reading') == 'data' and len(calls) == 3
  calls.clear()
  with pytest.raises(storage.StorageError, match=r'x: reading failed 2 time\(s\), last with '
                     r'ConnectionResetError: reset by peer'):
    storage.with_retries(flaky, storage.RetryPolicy(attempts=2, delay=0.0), lambda: 'x: reading')
  with pytest.raises(FileNotFoundError):   # not retried when retry_if says so
    storage.with_retries(lambda: open('/nonexistent/x'), policy, lambda: 'y',
                         retry_if=lambda e: not isinstance(e, FileNotFoundError))
