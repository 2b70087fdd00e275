"""Reading PyTorch weight files without running code from them; writing safetensors.

What is read, and how:

- `.safetensors`: parsed here (an 8-byte header length, a JSON header, raw
  little-endian tensor bytes). Every tensor's byte range is checked against the file
  size, so a truncated file is refused before anything is used. bfloat16 works
  without torch (through `ml_dtypes`).
- PyTorch zip archives written by `torch.save` (`.pt`, `.pth`, `.bin`): read with
  `torch.load(weights_only=True)`, whose unpickler only builds tensors and plain
  containers. Without torch installed, the restricted unpickler below reads them.
- TorchScript archives (OpenAI's released `.pt` files: a zip with `*/data.pkl`,
  `*/data/N` and `*/code/`): never given to `torch.jit.load`, which would compile
  and run the archive's code. The restricted unpickler reads `data.pkl`: it builds
  only tensors (`torch._utils._rebuild_tensor_v2`, the `torch.*Storage` types),
  `collections.OrderedDict`, TorchScript's list builders, and inert attribute
  holders for the `__torch__.*` module classes. Which attributes are parameters and
  buffers is read from the `__parameters__ = [...]` / `__buffers__ = [...]` lines of
  the archive's `code/` files as text; nothing from them is executed. Tensor bytes
  come from `*/data/<key>` and are checked against their declared sizes.
- Anything else that would need arbitrary unpickling (a pickle naming any other
  global) is refused with `UnsafeFileError`, naming the file and the global.

All results are `dict[str, np.ndarray]` in the file's own order and dtypes.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from clip_jax import storage

# safetensors dtype names <-> numpy dtypes.
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'U16': np.dtype(np.uint16), 'U32': np.dtype(np.uint32), 'U64': np.dtype(np.uint64),
    'BOOL': np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}

# torch.<Name>Storage -> numpy dtype, for the restricted unpickler.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    'FloatStorage': np.dtype(np.float32), 'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}

# Names of the numpy dtypes as users and configs spell them.
DTYPE_NAMES: dict[str, np.dtype] = {
    'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
    'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float64': np.dtype(np.float64),
    'int64': np.dtype(np.int64), 'int32': np.dtype(np.int32), 'bool': np.dtype(np.bool_),
}


class UnsafeFileError(ValueError):
  """A file that could only be read by running code from it."""


class CorruptFileError(ValueError):
  """A file that is truncated or not in the format it claims."""


def dtype_name(dtype: Any) -> str:
  dtype = np.dtype(dtype)
  for name, candidate in DTYPE_NAMES.items():
    if candidate == dtype:
      return name
  return dtype.name


# --- safetensors ----------------------------------------------------------------------------

def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a safetensors file (local: memory-mapped; or on a bucket);
  refuses truncated or malformed files."""
  path = str(storage.resolve(path))
  raw = storage.map_bytes(path)
  size = raw.size
  head = bytes(raw[:8])
  if len(head) < 8:
    raise CorruptFileError(f'{path}: not a safetensors file ({size} bytes, less than the '
                           '8-byte header length)')
  (header_len,) = struct.unpack('<Q', head)
  if header_len > size - 8:
    raise CorruptFileError(f'{path}: truncated or not a safetensors file: the header claims '
                           f'{header_len} bytes but the file has {size}')
  try:
    header = json.loads(bytes(raw[8:8 + header_len]))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CorruptFileError(f'{path}: not a safetensors file: its header is not JSON ({e})'
                           ) from None
  if not isinstance(header, dict):
    raise CorruptFileError(f'{path}: not a safetensors file: its header is not a JSON object')
  metadata = header.pop('__metadata__', None) or {}
  data_start = 8 + header_len
  tensors = {}
  for key, info in header.items():
    try:
      dtype = _SAFETENSORS_DTYPES[info['dtype']]
      shape = tuple(int(d) for d in info['shape'])
      begin, end = (int(o) for o in info['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise CorruptFileError(f'{path}: tensor {key!r} has a malformed header entry {info!r}'
                             ) from None
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != want or begin < 0:
      raise CorruptFileError(f'{path}: tensor {key!r} of shape {shape} and dtype '
                             f'{info["dtype"]} needs {want} bytes, its offsets give {end - begin}')
    if data_start + end > size:
      raise CorruptFileError(f'{path}: truncated: tensor {key!r} needs bytes up to '
                             f'{data_start + end} but the file has {size}')
    tensors[key] = raw[data_start + begin:data_start + end].view(dtype).reshape(shape)
  return tensors, dict(metadata)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (in their order) as safetensors; any of `_SAFETENSORS_DTYPES`."""
  header: dict[str, Any] = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for key, value in tensors.items():
    array = np.asarray(value)
    if array.dtype not in _SAFETENSORS_NAMES:
      raise ValueError(f'{path}: tensor {key!r} has dtype {array.dtype}, which safetensors '
                       f'cannot store (expected one of {sorted(set(map(str, _SAFETENSORS_NAMES)))})')
    header[key] = {'dtype': _SAFETENSORS_NAMES[array.dtype], 'shape': list(array.shape),
                   'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)   # the format aligns the data to 8 bytes
  with storage.atomic_write(path) as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for array in arrays:
      f.write(array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes())


# --- the restricted unpickler ---------------------------------------------------------------

class _StorageType:
  """Stands for `torch.<Name>Storage` in a pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


class ScriptObject:
  """An inert stand-in for a pickled TorchScript module: it only holds attributes."""
  qualified_name = '__torch__'

  def __setstate__(self, state: Any) -> None:
    self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *unused: Any) -> np.ndarray:
  del unused  # requires_grad, backward hooks, metadata: no bearing on the values
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s < 0 for s in stride) or len(size) != len(stride):
    raise CorruptFileError(f'tensor with size {size} and stride {stride} is malformed')
  extent = offset + (sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0)
  if offset < 0 or extent > storage.size:
    raise CorruptFileError(f'tensor of size {size} at offset {offset} reaches element {extent} '
                           f'of a storage with {storage.size}: the archive is corrupt')
  if not all(size):
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], size, tuple(s * storage.dtype.itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  return data


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.jit._pickle', 'build_intlist'): list,
    ('torch.jit._pickle', 'build_doublelist'): list,
    ('torch.jit._pickle', 'build_boollist'): list,
    ('torch.jit._pickle', 'build_tensorlist'): list,
    ('torch.jit._pickle', 'restore_type_tag'): lambda value, type_str: value,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds tensors and plain containers; refuses every other global."""

  def __init__(self, file: Any, source: str, load_storage: Callable[[str, np.dtype, int], np.ndarray],
               allow_script_classes: bool):
    super().__init__(file)
    self._source, self._load_storage = source, load_storage
    self._allow_script_classes = allow_script_classes
    self._classes: dict[str, type] = {}
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_FUNCTIONS:
      return _ALLOWED_FUNCTIONS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if self._allow_script_classes and (module == '__torch__' or module.startswith('__torch__.')):
      qualified = f'{module}.{name}'
      if qualified not in self._classes:
        self._classes[qualified] = type(name, (ScriptObject,), {'qualified_name': qualified})
      return self._classes[qualified]
    raise UnsafeFileError(
        f'{self._source}: refused: reading it would need arbitrary unpickling (it names the '
        f'global {module}.{name}, which is neither a tensor nor a plain container). Only load '
        'weights you trust with torch.load(weights_only=False), then save their state_dict()')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise UnsafeFileError(f'{self._source}: refused: unknown persistent id {pid!r} in the '
                            'pickle (expected a tensor storage)')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      self._storages[key] = self._load_storage(str(key), storage_type.dtype, int(numel))
    return self._storages[key]


def _zip_prefix(names: list[str], path: str) -> str:
  pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
  if not pickles:
    raise CorruptFileError(f'{path}: a zip archive without */data.pkl: not a PyTorch file')
  return pickles[0][:-len('data.pkl')]


def is_torchscript_archive(names: list[str]) -> bool:
  return any('/code/' in n or n.endswith('/constants.pkl') for n in names)


def _unpickle_zip(path: str, archive: zipfile.ZipFile, allow_script_classes: bool) -> Any:
  names = archive.namelist()
  prefix = _zip_prefix(names, path)

  def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f'{prefix}data/{key}'
    try:
      data = archive.read(name)
    except KeyError:
      raise CorruptFileError(f'{path}: missing tensor data {name}') from None
    if len(data) < numel * dtype.itemsize:
      raise CorruptFileError(f'{path}: truncated tensor data {name}: expected '
                             f'{numel * dtype.itemsize} bytes, found {len(data)}')
    return np.frombuffer(data, dtype, count=numel)

  with archive.open(f'{prefix}data.pkl') as f:
    return _RestrictedUnpickler(f, path, load_storage, allow_script_classes).load()


_PARAMS_LINE = re.compile(r'^\s*__(parameters|buffers)__\s*=\s*\[(.*?)\]', re.M)


def _script_state_names(archive: zipfile.ZipFile, prefix: str, qualified: str
                        ) -> list[str] | None:
  """The parameter and buffer names of a TorchScript class, read from its code as text."""
  module, _, name = qualified.rpartition('.')
  code_file = f'{prefix}code/{module.replace(".", "/")}.py'
  try:
    source = archive.read(code_file).decode('utf-8', 'replace')
  except KeyError:
    return None
  match = re.search(rf'^class {re.escape(name)}\(.*?(?=^class |\Z)', source, re.M | re.S)
  if not match:
    return None
  names = []
  for _, listed in sorted(_PARAMS_LINE.findall(match.group(0)), key=lambda m: m[0] != 'parameters'):
    names += re.findall(r'"([^"]*)"', listed)
  return names


def _script_state_dict(obj: ScriptObject, archive: zipfile.ZipFile, prefix: str,
                       key_prefix: str = '') -> dict[str, np.ndarray]:
  """What `torch.jit.load(path).state_dict()` gives, without loading the code."""
  state = getattr(obj, 'state', {})
  names = _script_state_names(archive, prefix, type(obj).qualified_name)
  if names is None:  # no class source: every tensor attribute counts
    names = [k for k, v in state.items() if isinstance(v, np.ndarray)]
  out = {key_prefix + n: state[n] for n in names if isinstance(state.get(n), np.ndarray)}
  for attr, value in state.items():
    if isinstance(value, ScriptObject):
      out.update(_script_state_dict(value, archive, prefix, f'{key_prefix}{attr}.'))
  return out


def read_torch_zip_restricted(path: str, data: str | io.BytesIO | None = None) -> Any:
  """A torch.save zip or TorchScript archive, read by the restricted unpickler (no torch).

  `data` is what zipfile reads (the file name, or the remote file's bytes); by default
  `storage.readable(path)`.
  """
  data = storage.readable(path) if data is None else data
  try:
    with zipfile.ZipFile(data) as archive:
      names = archive.namelist()
      script = is_torchscript_archive(names)
      obj = _unpickle_zip(path, archive, allow_script_classes=script)
      if script:
        if not isinstance(obj, ScriptObject):
          raise CorruptFileError(f'{path}: a TorchScript archive whose data.pkl is not a module')
        return _script_state_dict(obj, archive, _zip_prefix(names, path))
      return obj
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, pickle.UnpicklingError,
          OSError) as e:
    raise CorruptFileError(f'{path}: corrupt PyTorch archive ({type(e).__name__}: {e})') from None


# --- torch.load, when torch is installed -----------------------------------------------------

def _torch_to_numpy(value: Any, key: str, path: str) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(value, np.ndarray):
    return value
  if not isinstance(value, torch.Tensor):
    raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:   # numpy has no bfloat16: go through its bits
    return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return value.contiguous().numpy()


def _torch_load(path: str, data: str | io.BytesIO) -> Any:
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return torch.load(data, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeFileError(
        f'{path}: refused: torch.load(weights_only=True) could not read it; reading it would '
        f'need arbitrary unpickling. Only load weights you trust with '
        f'torch.load(weights_only=False), then save their state_dict(). ({str(e).splitlines()[0]})'
    ) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise CorruptFileError(f'{path}: not a readable PyTorch file ({type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""})') from None


def _has_torch() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


# --- one entry point for every weight file ---------------------------------------------------

def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """A state dict from a checkpoint: takes `state_dict` wrappers, strips `module.`."""
  for _ in range(2):
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
      obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f'{path}: expected a state dict (a mapping of names to tensors, maybe under '
                     f"'state_dict'), found {type(obj).__name__}")
  if all(isinstance(k, str) and k.startswith('module.') for k in obj):
    obj = {k[len('module.'):]: v for k, v in obj.items()}
  return obj


def _first_byte(data: str | io.BytesIO) -> bytes:
  if isinstance(data, io.BytesIO):
    return data.read(1)
  with storage.open(data, 'rb') as f:
    return f.read(1)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a weight file as numpy arrays, in the file's order and dtypes.

  Accepts `.safetensors`, `torch.save` zips (plain state dicts, with or without a
  `state_dict` wrapper or `module.` prefix) and TorchScript archives; see the module
  docstring for how each is read safely.
  """
  path = str(storage.resolve(path))
  if not storage.is_file(path):
    raise FileNotFoundError(f'{path}: no such file')
  if path.endswith('.safetensors'):
    return read_safetensors(path)[0]
  data = storage.readable(path)   # the local file's name, or a remote file's bytes

  def rewound() -> str | io.BytesIO:
    if isinstance(data, io.BytesIO):
      data.seek(0)
    return data

  if zipfile.is_zipfile(rewound()):
    with zipfile.ZipFile(rewound()) as archive:
      script = is_torchscript_archive(archive.namelist())
    obj = (read_torch_zip_restricted(path, rewound()) if script or not _has_torch()
           else _torch_load(path, rewound()))
  elif _first_byte(rewound()) == b'\x80':
    if not _has_torch():   # a legacy (pre-zip) torch.save pickle
      raise UnsafeFileError(f'{path}: a legacy PyTorch pickle; reading it safely needs torch '
                            "(pip install '.[torch]'), which is not installed")
    obj = _torch_load(path, rewound())
  else:
    try:
      tensors, _ = read_safetensors(path)
    except CorruptFileError as e:
      raise CorruptFileError(f'{path}: neither a safetensors file nor a PyTorch zip archive or '
                             f'pickle ({e})') from None
    return tensors
  state = _unwrap(obj, path)
  return {str(k): _torch_to_numpy(v, k, path) if not isinstance(v, np.ndarray) else v
          for k, v in state.items()}
