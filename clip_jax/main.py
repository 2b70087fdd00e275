r"""`python -m clip_jax.main`: train a CLIP model (and evaluate it) from a config file.

    python -m clip_jax.main                       # tiny on the built-in scenes, ./workdir
    python -m clip_jax.main --config=configs/vit_b32.py --workdir=gs://BUCKET/run \
        --config.batch_size=32768 --config.total_steps=390000

With no flags it trains `configs/tiny.py` on the built-in drawn scenes on the CPU in
a few minutes and prints the held-out zero-shot accuracy as its last line. Running
the same command again resumes from the latest checkpoint in the workdir (after a
crash or a preemption); SIGTERM saves a checkpoint and exits 0. `--dry_run` checks the
config, the mesh, the data, the tokenizer, the eval sets and the workdir, prints the
plan and trains nothing. `--verbosity=1` adds the debug logs (and the libraries'
start-up chatter) to the console.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from clip_jax import storage

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
  flags.DEFINE_bool('dry_run', False,
                    'Set up and check everything (config, mesh, data, tokenizer, eval sets, '
                    'workdir), print the plan, train nothing.')


def resolve_config_argument(argv: list[str]) -> list[str]:
  """`--config=configs/x.py[:arg]` found beside the package when not under the cwd.

  The README's commands name the shipped configs as `configs/...`; from another
  folder than the clone's root they would not be found. A file under the cwd wins.
  """
  out = []
  for arg in argv:
    if arg.startswith('--config='):
      path, colon, config_arg = arg[len('--config='):].partition(':')
      shipped = os.path.join(REPO, path)
      if not os.path.isabs(path) and not storage.exists(path) and storage.is_file(shipped):
        arg = f'--config={shipped}{colon}{config_arg}'
    out.append(arg)
  return out


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


# orbax logs every step of every save at INFO, gcsfs every file it opens, jax that it
# found no TPU (libtpu) on every start, tensorboardX how it renames tags; their
# warnings and errors still show, and --verbosity=1 shows everything.
_CHATTY_AT_INFO = ('orbax', 'gcsfs', 'jax', 'tensorboardX')


def _quiet_libraries(record: logging.LogRecord) -> bool:
  return (record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= 1 or
          not any(f'{os.sep}{name}{os.sep}' in record.pathname for name in _CHATTY_AT_INFO))


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
  try:
    distributed.initialize()
  except distributed.ClusterError as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    return 1
  from clip_jax import train  # pylint: disable=import-outside-toplevel
  try:
    workdir = storage.resolve(flags.FLAGS.workdir)
  except ValueError as error:
    _fail(f'--workdir: {error}')
  print(f'config: {flags.FLAGS["config"].config_filename}\n'
        f'workdir: {workdir}\n{distributed.describe()}', flush=True)
  # The keys given as --config.KEY=VALUE win over what the config file implies.
  explicit = frozenset(config_flags.get_override_values(flags.FLAGS['config']))
  try:
    train.train_and_evaluate(config, workdir, explicit=explicit, dry_run=flags.FLAGS.dry_run)
  except (ValueError, OSError, FloatingPointError) as error:
    # Bad config or input, refused workdir, a storage fault (StorageError names the file
    # and offset), NaN loss: the message says what to change.
    print(f'error: {error}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  sys.argv = resolve_config_argument(sys.argv)
  try:
    define_flags()
  except _OVERRIDE_ERRORS as error:
    _fail(f'bad --config override: {_override_message(error)}')
  app.run(main, flags_parser=parse_flags)
