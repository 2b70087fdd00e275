"""Training logs: a console line, `metrics.jsonl`, TensorBoard event files, a progress bar.

Both files live in the workdir, local or on a bucket (through clip_jax.storage).
TensorBoard events are written by tensorboardX: it needs neither tensorflow (imported
only under clip_jax/data/, and absent from some accelerator images) nor torch, and
writes `gs://` itself (through google-cloud-storage, re-uploading the event file on
each flush, since objects cannot be appended to).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping, TextIO

from clip_jax import storage

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# The trainer's own metric names (the train step's are its output keys: loss,
# accuracy, temperature, grad_norm, learning_rate). One name everywhere: console,
# metrics.jsonl, TensorBoard tags and the docs.
DATA_SKIPPED = 'data/skipped'          # samples dropped so far (corrupt, no caption, ...)
IMAGES_PER_SECOND = 'images_per_second'
MFU = 'mfu'
EVAL_PREFIX = 'eval/'                  # eval/<task>/<dataset>/<metric>


def _summary_writer(logdir: str) -> Any:
  """tensorboardX.SummaryWriter, imported without torch.

  tensorboardX imports torch when it is installed, only to accept torch tensors; the
  trainer logs floats, and the import would cost every run seconds and ~500 MB. A None
  entry in sys.modules makes `import torch` fail (Python's documented way), for the
  moment tensorboardX is imported; a torch already imported is left alone.
  """
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if blocked:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter(logdir)


# --- the console ----------------------------------------------------------------------

def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


def console_line(step: int, total_steps: int, metrics: Mapping[str, float], elapsed: float,
                 steps_per_second: float) -> str:
  """`step 100/300 | loss 2.31 | lr 1.2e-03 | temp 21.4 | 930 img/s | MFU 41.0% |
  skipped 3 | elapsed 1m02s, ETA 2m04s`."""
  parts = [f'step {step}/{total_steps}']
  for key, label, fmt in (('loss', 'loss', '.4f'), ('learning_rate', 'lr', '.2e'),
                          ('temperature', 'temp', '.2f'), ('accuracy', 'acc', '.3f'),
                          (IMAGES_PER_SECOND, 'img/s', '.0f')):
    if key in metrics:
      parts.append(f'{label} {metrics[key]:{fmt}}' if label != 'img/s'
                   else f'{metrics[key]:{fmt}} {label}')
  if MFU in metrics:
    parts.append(f'MFU {100 * metrics[MFU]:.1f}%')
  if DATA_SKIPPED in metrics:
    parts.append(f'skipped {int(metrics[DATA_SKIPPED])}')
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

  def __init__(self, workdir: storage.PathLike, log_config: Mapping[str, Any],
               total_steps: int, active: bool = True):
    self.active = active
    self.total_steps = int(total_steps)
    self.jsonl_path = storage.join(workdir, METRICS_FILE)
    self.tensorboard_dir = storage.join(workdir, TENSORBOARD_DIR)
    self._jsonl: storage.TextLog | None = None
    self._tensorboard = None
    self.bar = ProgressBar(total_steps) if (active and log_config['progress_bar']) else None
    if active:
      self._jsonl = storage.TextLog(self.jsonl_path)
      if log_config['tensorboard']:
        self._tensorboard = _summary_writer(str(self.tensorboard_dir))

  def write(self, step: int, metrics: Mapping[str, float], console: str | None = None) -> None:
    """Records `metrics` at `step`; prints `console` (if given) above the progress bar."""
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps(dict(step=int(step), time=time.time(), **values)) + '\n')
    if self._tensorboard is not None:
      for tag, value in values.items():
        self._tensorboard.add_scalar(tag, value, int(step))
      self._tensorboard.flush()
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
