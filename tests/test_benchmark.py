"""clip_jax.benchmark: the CLI's JSON (its FLOPs agree with XLA's) and a step loop with no host
traffic. The FLOP count itself: tests/test_flops.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax import config as base_config
from clip_jax import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_on_tiny_without_tensorflow(tmp_path):
  """The CLI runs with tensorflow unimportable, prints the table and writes the JSON; the
  whole train step's XLA FLOPs agree with the analytic count within 15% (tiny's
  elementwise and optimizer work is relatively larger than a real model's: its two-layer
  towers skip most of their last layer, which leaves 63% of the matmul FLOPs)."""
  out = tmp_path / 'result.json'
  code = ('import sys, runpy; sys.modules["tensorflow"] = None; '
          'sys.argv = ["clip_jax.benchmark", "--config=configs/tiny.py", '
          '"--batch_per_device=4", "--steps=2", "--warmup=1", '
          f'"--output={out}"]; runpy.run_module("clip_jax.benchmark", run_name="__main__")')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step time' in proc.stdout and 'MFU' in proc.stdout and f'wrote {out}' in proc.stdout
  result = json.loads(out.read_text())
  for key in ('compile_s', 'step_time_median_s', 'step_time_iqr_s', 'images_per_s_total',
              'images_per_s_per_device', 'model_flops_per_step', 'xla_flops_per_step',
              'mfu', 'compiled_peak_bytes'):
    assert result[key] is not None and result[key] > 0, key
  assert result['num_devices'] == 2 and result['global_batch'] == 8
  assert result['images_per_s_total'] == pytest.approx(8 / result['step_time_median_s'])
  assert result['peak_source'] == 'measured matmul'
  assert result['xla_over_model_flops'] == pytest.approx(1.0, abs=0.15)
  assert np.isfinite(result['final_loss'])


def test_steps_do_not_touch_the_host_and_donate_state():
  """Several train steps on device-resident batches under a transfer guard: any implicit
  host<->device copy in the loop would raise. The donated input state is consumed."""
  config = base_config.get_config('tiny')
  setup = benchmark.setup_step(config, batch_per_device=2)
  state = setup.state
  state, _ = setup.step(state, setup.batch)        # compile outside the guard
  old_leaf = jax.tree_util.tree_leaves(state.params)[0]
  with jax.transfer_guard('disallow'):
    for _ in range(3):
      state, metrics = setup.step(state, setup.batch)
    jax.block_until_ready((state, metrics))
  assert old_leaf.is_deleted()
  assert int(jax.device_get(state.step)) == 4
  assert np.isfinite(float(jax.device_get(metrics['loss'])))
