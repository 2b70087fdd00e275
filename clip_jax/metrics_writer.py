"""Training logs: a console line, `metrics.jsonl`, TensorBoard event files, a progress bar.

TensorBoard reads TFRecord files of `Event` protocol buffers. tensorflow may not be
imported outside `clip_jax/data` (accelerator hosts may lack it), and the scalar
events are simple enough to write by hand: the record framing (length, masked
CRC-32C, payload, masked CRC-32C) and the few protobuf fields used are encoded below.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping, TextIO

# --- CRC-32C (Castagnoli), as TFRecord framing needs -------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(payload: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, payload, masked CRC of it."""
  length = struct.pack('<Q', len(payload))
  return (length + struct.pack('<I', _masked_crc(length)) + payload
          + struct.pack('<I', _masked_crc(payload)))


# --- the protobuf fields of tensorflow.Event / Summary used here ---------------------------

def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    bits, value = value & 0x7F, value >> 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


def scalar_event(step: int, values: Mapping[str, float], wall_time: float | None = None
                 ) -> bytes:
  """A serialized Event{wall_time=1, step=2, summary=5{value=1{tag=1, simple_value=2}}}."""
  summary = b''.join(
      _length_delimited(1, _length_delimited(1, tag.encode('utf-8'))
                        + _field(2, 5, struct.pack('<f', float(value))))
      for tag, value in values.items())
  return (_field(1, 1, struct.pack('<d', time.time() if wall_time is None else wall_time))
          + _field(2, 0, _varint(int(step))) + _length_delimited(5, summary))


class EventFileWriter:
  """Scalars to `<logdir>/events.out.tfevents.<time>.<host>`, readable by TensorBoard."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}')
    self._file = open(self.path, 'ab')
    # The first event of a file names the format version.
    version = (_field(1, 1, struct.pack('<d', time.time()))
               + _length_delimited(3, b'brain.Event:2'))
    self._file.write(tfrecord_frame(version))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._file.write(tfrecord_frame(scalar_event(step, values)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# --- the console ----------------------------------------------------------------------

def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


def console_line(step: int, total_steps: int, metrics: Mapping[str, float], elapsed: float,
                 steps_per_second: float) -> str:
  """`step 100/300 | loss 2.31 | lr 1.2e-03 | temp 21.4 | 930 img/s | MFU 41.0% | 1m02s, ETA 2m04s`."""
  parts = [f'step {step}/{total_steps}']
  for key, label, fmt in (('loss', 'loss', '.4f'), ('learning_rate', 'lr', '.2e'),
                          ('temperature', 'temp', '.2f'), ('accuracy', 'acc', '.3f'),
                          ('images_per_second', 'img/s', '.0f')):
    if key in metrics:
      parts.append(f'{label} {metrics[key]:{fmt}}' if label != 'img/s'
                   else f'{metrics[key]:{fmt}} {label}')
  if 'mfu' in metrics:
    parts.append(f'MFU {100 * metrics["mfu"]:.1f}%')
  eta = (total_steps - step) / steps_per_second if steps_per_second > 0 else math.inf
  parts.append(f'elapsed {format_duration(elapsed)}, ETA '
               f'{format_duration(eta) if math.isfinite(eta) else "?"}')
  return ' | '.join(parts)


class ProgressBar:
  """`[#######.......]  412/1000` redrawn in place; silent unless the stream is a TTY."""

  def __init__(self, total: int, stream: TextIO | None = None, width: int = 30,
               min_interval: float = 0.2):
    self.stream = stream or sys.stdout
    self.enabled = bool(getattr(self.stream, 'isatty', lambda: False)())
    self.total, self.width, self.min_interval = max(1, total), width, min_interval
    self._last_draw = 0.0
    self._visible = False

  def update(self, step: int) -> None:
    now = time.time()
    if not self.enabled or now - self._last_draw < self.min_interval:
      return
    filled = int(self.width * min(step, self.total) / self.total)
    self.stream.write(f'\r[{"#" * filled}{"." * (self.width - filled)}] {step}/{self.total}')
    self.stream.flush()
    self._last_draw, self._visible = now, True

  def clear(self) -> None:
    """Erases the bar so that a log line can be printed in its place."""
    if self._visible:
      self.stream.write('\r' + ' ' * (self.width + 24) + '\r')
      self.stream.flush()
      self._visible = False


class MetricsWriter:
  """Every log step: one console line, one `metrics.jsonl` line, TensorBoard scalars.

  Only process 0 writes (`active=False` elsewhere); the others keep silent.
  """

  def __init__(self, workdir: str, log_config: Mapping[str, Any], total_steps: int,
               active: bool = True):
    self.active = active
    self.total_steps = int(total_steps)
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    self.bar = ProgressBar(total_steps) if (active and log_config['progress_bar']) else None
    if active:
      os.makedirs(workdir, exist_ok=True)
      if log_config['tensorboard']:
        self._tensorboard = EventFileWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float], console: str | None = None) -> None:
    """Records `metrics` at `step`; prints `console` (if given) above the progress bar."""
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with open(self.jsonl_path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(dict(step=int(step), time=time.time(), **values)) + '\n')
    if self._tensorboard is not None:
      self._tensorboard.scalars(step, values)
    if console:
      self.print(console)

  def print(self, line: str) -> None:
    if not self.active:
      return
    if self.bar is not None:
      self.bar.clear()
    print(line, flush=True)

  def progress(self, step: int) -> None:
    if self.bar is not None:
      self.bar.update(step)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.clear()
    if self._tensorboard is not None:
      self._tensorboard.close()
