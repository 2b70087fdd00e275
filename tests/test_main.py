"""`python -m clip_jax.main`: flags, the default config, and clear errors for bad input."""

import os
import subprocess
import sys

from clip_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
  return subprocess.run([sys.executable, '-m', 'clip_jax.main', *args], cwd=REPO, timeout=120,
                        capture_output=True, text=True)


def test_default_config_is_tiny_in_the_repo():
  assert main.DEFAULT_CONFIG == os.path.join(REPO, 'configs', 'tiny.py')
  assert os.path.exists(main.DEFAULT_CONFIG)


def test_help_names_the_flags_and_defaults():
  result = run('--help')   # absl's --help exits with status 1 after printing
  assert 'Traceback' not in result.stderr
  assert '--config: Experiment config file' in result.stdout
  assert "(default: './workdir')" in result.stdout
  assert 'configs/tiny.py' in result.stdout


def test_bad_flags_are_one_line_errors():
  typo = run('--config.optim.learnin_rate=1')
  assert typo.returncode == 2
  assert 'error: bad --config override:' in typo.stderr and 'learnin_rate' in typo.stderr
  assert 'Did you mean "learning_rate"' in typo.stderr and 'Traceback' not in typo.stderr
  wrong_type = run('--config.batch_size=many')
  assert wrong_type.returncode == 2 and '--config.batch_size=many' in wrong_type.stderr
  missing = run('--config=/nonexistent/config.py')
  assert missing.returncode == 2 and '/nonexistent/config.py' in missing.stderr
  assert 'Traceback' not in missing.stderr
  extra = run('positional')
  assert extra.returncode != 0 and 'unexpected arguments' in extra.stderr
