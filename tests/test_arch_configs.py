"""Each architecture's `:local` variant trains two steps on the CPU, as its docstring says.

The documented command runs verbatim (plus `--config.total_steps=2`) from a new folder
holding a `configs` link, on one CPU device as on a user's machine: the full-width
model at its own image size, bfloat16, the paper's AdamW and warmup, the built-in
scenes, checkpoint and zero-shot evaluation. Minutes each on 2 cores (see the configs'
docstrings), so they are `slow`.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from test_config import CONFIG_DIR, PAPER, load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_command(name):
  return f'python -m clip_jax.main --config=configs/{name}.py:local --workdir=./{name}_local'


# CI's time budget holds one architecture of each family (about 7 CPU-minutes); all nine
# take about 50 CPU-minutes, and RN50x64's needs more than 20 GB of memory (see its
# docstring): CLIP_JAX_TEST_ALL_ARCHITECTURES=1 runs them all.
CI_ARCHITECTURES = ('rn50', 'vit_b32')
ARCHITECTURES = (sorted(PAPER) if os.environ.get('CLIP_JAX_TEST_ALL_ARCHITECTURES') == '1'
                 else CI_ARCHITECTURES)


@pytest.mark.slow
@pytest.mark.parametrize('name', ARCHITECTURES)
def test_local_variant_trains_two_steps(name, tmp_path):
  module = load_config_file(os.path.join(CONFIG_DIR, f'{name}.py'))
  assert local_command(name) in module.__doc__
  arch, lr = PAPER[name][:2]
  os.symlink(os.path.join(REPO, 'configs'), tmp_path / 'configs')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device
  argv = [sys.executable] + local_command(name).split()[1:] + ['--config.total_steps=2']
  result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  workdir = tmp_path / f'{name}_local'
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['name'] == arch and config['model']['dtype'] == 'bfloat16'
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = {r['step']: r for r in records if 'loss' in r}
  assert sorted(train) == [1, 2]
  for step, record in train.items():
    # The first steps of the paper's warmup: lr x (s + 1) / 2000 at step s = step - 1.
    assert record['learning_rate'] == pytest.approx(lr * step / 2000, rel=1e-6)
    assert math.isfinite(record['loss']) and record['grad_norm'] > 0
    assert record['temperature'] == pytest.approx(1 / 0.07, rel=1e-3)
  assert (workdir / 'checkpoints' / '2').is_dir()
  metrics = json.loads((workdir / 'eval_results.json').read_text())['metrics']
  assert metrics['zeroshot/builtin_test/num_examples'] == 2
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith('zero-shot top-1 on held-out: ') and np.isfinite(
      float(last.split(': ')[1].split('%')[0]))
