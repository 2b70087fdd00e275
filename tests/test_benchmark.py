"""clip_jax.benchmark: the FLOP count, the CLI's JSON, and a step loop with no host traffic."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax import config as base_config
from clip_jax import benchmark
from clip_jax.models.architectures import model_config
from clip_jax.models.clip import build_model, dummy_inputs, param_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# open_clip's docs/model_profile.csv (fvcore counts a multiply-add as one FLOP, so these
# are GMACs per image / caption): ours must agree to 1%.
OPEN_CLIP_GMACS = {'ViT-B/32': (4.41, 2.96), 'ViT-B/16': (17.58, 2.96),
                   'ViT-L/14': (81.08, 6.65)}


@pytest.mark.parametrize('name', sorted(OPEN_CLIP_GMACS))
def test_model_flops_match_open_clip_profile(name):
  flops = benchmark.model_flops(model_config(name), batch=1, pooled=False)
  image, text = OPEN_CLIP_GMACS[name]
  assert flops['image_forward'] / 2e9 == pytest.approx(image, rel=0.01)
  assert flops['text_forward'] / 2e9 == pytest.approx(text, rel=0.01)
  assert flops['total'] == 3 * (flops['image_forward'] + flops['text_forward']
                                + flops['loss_forward'])
  # The unrolled model's last block runs for the pooled token only: 5/6 of a layer less.
  pooled = benchmark.model_flops(model_config(name), batch=1)
  layers = model_config(name).vision.layers
  assert (1 - 1 / layers < pooled['image_forward'] / flops['image_forward']
          < 1 - 0.75 / layers)


# XLA's count includes elementwise work (norms, activations, softmax), so it is a few
# percent above the matmul count for real models; 5% is the stated tolerance.
@pytest.mark.parametrize('name', ['RN50', 'ViT-B/32', 'tiny'])
def test_forward_flops_match_xla_cost_analysis(name):
  cfg = model_config(name)
  model = build_model(cfg)
  variables = param_shapes(cfg)
  images, tokens = dummy_inputs(cfg, batch=2)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  image_cost = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)).lower(
      variables, abstract(images)).cost_analysis()['flops']
  text_cost = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)).lower(
      variables, abstract(tokens)).cost_analysis()['flops']
  flops = benchmark.model_flops(cfg, batch=2)
  assert image_cost / flops['image_forward'] == pytest.approx(1.0, abs=0.05)
  assert text_cost / flops['text_forward'] == pytest.approx(1.0, abs=0.05)


def test_peak_table_lookup():
  class Fake:
    def __init__(self, kind):
      self.device_kind = kind
  assert benchmark.peak_flops(Fake('NVIDIA H100 80GB HBM3'), 'bfloat16') == 989e12
  assert benchmark.peak_flops(Fake('NVIDIA H100 PCIe'), 'bfloat16') == 756e12
  assert benchmark.peak_flops(Fake('TPU v5 lite'), 'bfloat16') == 197e12
  assert benchmark.peak_flops(Fake('TPU v4'), 'float32') == 275e12
  assert benchmark.peak_flops(Fake('cpu'), 'float32') is None


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
