r"""`python -m clip_jax.main`: train a CLIP model (and evaluate it) from a config file.

    python -m clip_jax.main                       # tiny on the built-in scenes, ./workdir
    python -m clip_jax.main --config=configs/vit_b32.py --workdir=gs://BUCKET/run \
        --config.batch_size=32768 --config.total_steps=390000

With no flags it trains `configs/tiny.py` on the built-in drawn scenes on the CPU in
a few minutes and prints the held-out zero-shot accuracy as its last line. Running
the same command again resumes from the latest checkpoint in the workdir (after a
crash or a preemption); SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# configs/ sits beside the package in a clone (pip install -e .).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
# config_flags reports an unknown or mistyped --config.KEY=VALUE with these.
_OVERRIDE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def define_flags() -> None:
  """--config (with --config.KEY=VALUE overrides, read from sys.argv) and --workdir."""
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG,
      'Experiment config file (configs/*.py); override any key with --config.KEY=VALUE.',
      lock_config=True)
  flags.DEFINE_string('workdir', './workdir',
                      'Where config.json, checkpoints, metrics and TensorBoard files go '
                      '(local path or gs://); an existing one is resumed.')


def _fail(message: str) -> None:
  print(f'error: {message}\nPass --help for the flags.', file=sys.stderr, flush=True)
  sys.exit(2)


def _override_message(error: BaseException) -> str:
  # KeyError/AttributeError wrap their text in quotes and escape its newlines.
  return ' '.join(str(error).strip('\'"').replace('\\n', ' ').replace("\\'", "'").split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail(str(error))
  except _OVERRIDE_ERRORS as error:
    _fail(f'bad --config override: {_override_message(error)}')
  return []


_CHATTY_AT_INFO = ('orbax', 'gcsfs')


def _quiet_libraries(record: logging.LogRecord) -> bool:
  # orbax logs every step of every save at INFO, gcsfs every file it opens; their
  # warnings and errors still show.
  return record.levelno >= logging.WARNING or not any(
      f'{os.sep}{name}{os.sep}' in record.pathname for name in _CHATTY_AT_INFO)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; settings go in '
                         '--config.KEY=VALUE flags')
  absl_logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    config = flags.FLAGS.config
    config.get('model')   # a config file that failed to load raises here
  except OSError as error:
    _fail(f'--config: {error}')
  # First thing that touches JAX: several processes (a pod slice, a GPU cluster) meet.
  from clip_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize()
  from clip_jax import train  # pylint: disable=import-outside-toplevel
  from clip_jax import storage  # pylint: disable=import-outside-toplevel
  try:
    workdir = storage.resolve(flags.FLAGS.workdir)
  except ValueError as error:
    _fail(f'--workdir: {error}')
  print(f'config: {flags.FLAGS["config"].config_filename}\n'
        f'workdir: {workdir}\n{distributed.describe()}', flush=True)
  try:
    train.train_and_evaluate(config, workdir)
  except (ValueError, OSError, FloatingPointError) as error:
    # Bad config or input, refused workdir, a storage fault (StorageError names the file
    # and offset), NaN loss: the message says what to change.
    print(f'error: {error}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  try:
    define_flags()
  except _OVERRIDE_ERRORS as error:
    _fail(f'bad --config override: {_override_message(error)}')
  app.run(main, flags_parser=parse_flags)
