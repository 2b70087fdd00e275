"""TFRecord framing, read and written in Python over clip_jax.storage.

tf.data's TFRecordDataset reads only through TensorFlow's own file systems: its GCS
client cannot be pointed at anything but Google's servers, and an I/O error inside it
cannot be told from a corrupt record once tf.data has it. Reading the framing here puts
every byte of a shard through the one path layer, with its retries, and lets a storage
fault stop the run instead of silently ending the shard. The format is four fields:

    uint64 length | uint32 masked CRC-32C of length | payload | uint32 masked CRC-32C of payload

(little-endian; mask = rotate right 15, add 0xa282ead8). CRC-32C comes from the
`google-crc32c` C library. Both directions are checked against TensorFlow's own reader
and writer in tests/test_data_sources.py.
"""

from __future__ import annotations

import struct
from typing import IO, Iterator

import google_crc32c

from clip_jax import storage

_HEADER = struct.Struct('<QI')
_FOOTER = struct.Struct('<I')


class CorruptShardError(ValueError):
  """Framing that cannot be followed any further: the rest of the shard is unreadable."""


def masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
  """One record as it is stored."""
  length = struct.pack('<Q', len(payload))
  return length + struct.pack('<I', masked_crc(length)) + payload + _FOOTER.pack(
      masked_crc(payload))


def _read_exactly(stream: IO[bytes], count: int) -> bytes:
  chunks, missing = [], count
  while missing:
    chunk = stream.read(missing)
    if not chunk:
      break
    chunks.append(chunk)
    missing -= len(chunk)
  return b''.join(chunks)


def read_records(stream: IO[bytes], where: str = 'stream') -> Iterator[bytes | None]:
  """The payloads of a TFRecord stream; None for a record whose payload CRC is wrong.

  A bad length field or a file that ends inside a record raises CorruptShardError
  (where the next record starts is unknown). Storage faults pass through as they come
  (StorageError from clip_jax.storage.RetryingReader).
  """
  offset, index = 0, 0
  while True:
    header = _read_exactly(stream, _HEADER.size)
    if not header:
      return
    if len(header) < _HEADER.size:
      raise CorruptShardError(f'{where}: ends inside the header of record {index} '
                              f'(byte {offset})')
    length, length_crc = _HEADER.unpack(header)
    if length_crc != masked_crc(header[:8]):
      raise CorruptShardError(f'{where}: corrupt length of record {index} (byte {offset})')
    body = _read_exactly(stream, length + _FOOTER.size)
    if len(body) < length + _FOOTER.size:
      raise CorruptShardError(f'{where}: ends inside record {index} (byte {offset}, '
                              f'{length} bytes announced)')
    payload = body[:length]
    (payload_crc,) = _FOOTER.unpack(body[length:])
    yield payload if payload_crc == masked_crc(payload) else None
    offset += _HEADER.size + len(body)
    index += 1


class ShardWriter:
  """An open TFRecord file to write records into one at a time (atomic on close)."""

  def __init__(self, path: storage.PathLike):
    self.path = storage.resolve(path)
    self._context = storage.atomic_write(self.path)
    self._file = self._context.__enter__()

  def write(self, payload: bytes) -> None:
    self._file.write(frame(payload))

  def close(self, error: BaseException | None = None) -> None:
    if error is None:
      self._context.__exit__(None, None, None)
    else:
      self._context.__exit__(type(error), error, error.__traceback__)
