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


def test_stage_flags_replace_the_configs_first_stage(monkeypatch):
  from absl import flags
  tiny = os.path.join(REPO, 'configs', 'tiny.py')
  for args, expected in (([], (0.0, 32, 16)),
                         (['--mask_ratio=0.5', '--image_size=16'], (0.5, 16, 16)),
                         (['--config.train.stages=((300,0.25,16,8),)', '--text_length=4'],
                          (0.25, 16, 4))):
    values = flags.FlagValues()
    benchmark.define_flags(values)
    argv = ['benchmark', f'--config={tiny}', *args]
    monkeypatch.setattr('sys.argv', argv)   # config_flags reads its overrides there
    values(argv)
    assert benchmark.stage_from_flags(values.config, values).settings == expected, args


@pytest.mark.slow
def test_masked_and_reduced_stage_steps_are_measured():
  """--mask_ratio / --image_size / --text_length time the trainer's step of that stage: the
  analytic FLOPs are the stage's (clip_jax.flops), the batch has the stage's shapes and
  XLA's count of the step's program falls with masking. A stage the model cannot run is
  refused naming the flags."""
  from clip_jax import flops
  tiny = lambda: base_config.get_config('tiny')  # noqa: E731
  small = benchmark.benchmark_stage(tiny(), mask_ratio=0.75, image_size=16, text_length=8)
  result = benchmark.run_benchmark(tiny(), batch_per_device=2, steps=1, warmup=0,
                                   measure_cpu_peak=False, stage=small)
  assert (result['mask_ratio'], result['image_size'], result['text_length']) == (0.75, 16, 8)
  assert result['model_flops_per_step'] == flops.model_flops(
      tiny().model, 16, mask_ratio=0.75, image_size=16, text_length=8)['total']
  assert np.isfinite(result['final_loss'])
  assert 'mask 0.75, 16 px, 8 tokens' in benchmark.format_table(result)
  # XLA's count of the lowered (not compiled) step at 32 px: masking drops 12 of 16 patches.
  counts = {}
  for mask_ratio in (0.0, 0.75):
    setup = benchmark.setup_step(tiny(), 1, benchmark.benchmark_stage(
        tiny(), mask_ratio=mask_ratio, text_length=8))
    assert setup.batch['image'].shape == (8, 32, 32, 3) and setup.batch['text'].shape == (8, 8)
    counts[mask_ratio] = setup.step.lower(setup.state, setup.batch).cost_analysis()['flops']
  assert counts[0.75] < 0.7 * counts[0.0]
  assert benchmark.synthetic_batch(tiny().model, 4, 0, 16, 8)['image'].shape == (4, 16, 16, 3)
  with pytest.raises(ValueError, match=r'--mask_ratio / --image_size / --text_length: '
                     r'config\.train\.stages\[0\]: mask_ratio'):
    benchmark.benchmark_stage(tiny(), mask_ratio=1.0)


@pytest.mark.slow
def test_stage_speed_script_times_every_variant_side_by_side():
  """benchmarks/stage_speed.py on tiny (tensorflow unimportable, as in the GPU image): one
  row per variant, the reference at 1.00x, model FLOPs falling with the mask and the size."""
  code = ('import sys, runpy; sys.modules["tensorflow"] = None; '
          'sys.argv = ["stage_speed.py", "--model=tiny", "--batch_per_device=4", '
          '"--steps=1", "--rounds=1"]; '
          'runpy.run_path("benchmarks/stage_speed.py", run_name="__main__")')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [(r['image_size'], r['mask_ratio']) for r in rows] == [
      (32, 0.0), (32, 0.5), (32, 0.75), (16, 0.0)]
  assert rows[0]['speedup'] == 1.0 and all(r['step_s'] > 0 for r in rows)
  gflops = [r['model_gflops'] for r in rows]
  assert gflops[0] > gflops[1] > gflops[2] and gflops[0] > gflops[3]
  assert '| 32 | 0.5 |' in proc.stdout
