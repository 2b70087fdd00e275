r"""Training-step benchmark: compile time, step time, images/s, model FLOPs, MFU, memory.

  python -m clip_jax.benchmark --config=configs/vit_b16.py --batch_per_device=256 \
      --steps=20 --config.model.dtype=bfloat16

Times helper C's jitted, donated train step (`clip_jax.train_step`) on synthetic,
device-resident batches after warm-up (`--pipeline` feeds it from the real input
pipeline instead, which needs tensorflow and `config.data`). Prints a table, then
one JSON line; `--output=FILE` also writes the JSON.

Model FLOPs are counted from the architecture (every matmul and convolution of both
towers and the loss; a training step is 3x the forward: forward, and two matmuls per
forward matmul in the backward pass), independent of remat, and cross-checked
against XLA's own count (`compiled.cost_analysis()`, which also counts elementwise
work, the optimizer, and the recomputation that remat adds). MFU = model FLOPs per
second / the device's peak (bf16 dense, from `PEAK_FLOPS`); on CPU, where no
published peak applies, the peak is measured with a large jitted matmul.

Nothing here imports tensorflow unless `--pipeline` is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import sharding, train_step
from clip_jax.models.clip import build_model

# Dense (no sparsity) peak FLOP/s per chip, by a substring of `device.device_kind`,
# most specific first. bfloat16 on every device; float32 matmuls run at the TF32 rate
# on NVIDIA GPUs (JAX's default precision) and as bf16 passes on TPU.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('TPU v6', {'bfloat16': 918e12, 'float32': 918e12}),          # v6e (Trillium)
    ('TPU v5p', {'bfloat16': 459e12, 'float32': 459e12}),
    ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),     # v5e
    ('TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    ('TPU v5', {'bfloat16': 459e12, 'float32': 459e12}),          # v5p reports 'TPU v5'
    ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
    ('H200', {'bfloat16': 989e12, 'float32': 494.5e12}),
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float32': 494.5e12}),          # SXM
    ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
)


def peak_flops(device: jax.Device, dtype: str) -> float | None:
  """The published dense peak of `device` for compute `dtype`, or None if unknown."""
  kind = getattr(device, 'device_kind', '')
  for key, peaks in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return peaks.get(dtype, peaks['bfloat16'])
  return None


def measure_matmul_peak(dtype: str = 'float32', size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device (best
  of `repeats`): the practical peak on CPUs, which have no published number here."""
  x = jnp.ones((size, size), jnp.dtype(dtype))
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


# ---------------------------------------------------------------------------------------
# Analytic FLOPs. A matmul [m, k] @ [k, n] is 2mkn FLOPs; attention is counted in full
# (the causal text mask does not skip work in XLA's kernels).
# ---------------------------------------------------------------------------------------

def _transformer_flops(batch: int, tokens: int, width: int, layers: int, pooled: bool,
                       mlp_ratio: int = 4) -> int:
  """A stack of pre-LN blocks; `pooled`: the last block runs for one token per example
  (keys and values still for all), as `Transformer(final_positions=...)` does unrolled."""
  per_token = 2 * width * 3 * width + 2 * width * width + 2 * 2 * width * mlp_ratio * width
  attention = 2 * 2 * tokens * tokens * width            # q.k^T and weights.v
  if not pooled:
    return layers * batch * (tokens * per_token + attention)
  last = tokens * 2 * width * 2 * width + per_token - 2 * width * 2 * width + 2 * 2 * tokens * width
  return (layers - 1) * batch * (tokens * per_token + attention) + batch * last


def _resnet_flops(batch: int, image_size: int, layers: Sequence[int], width: int,
                  heads: int, embed_dim: int) -> int:
  """OpenAI's ModifiedResNet: stem, bottlenecks (with avg-pool downsampling), attnpool."""
  del heads  # the attention pool's FLOPs do not depend on the number of heads
  conv = lambda hw, k, cin, cout: 2 * hw * hw * k * k * cin * cout
  side = image_size // 2
  half = width // 2
  flops = conv(side, 3, 3, half) + conv(side, 3, half, half) + conv(side, 3, half, width)
  side //= 2
  inplanes = width
  for stage, blocks in enumerate(layers):
    planes = width * 2 ** stage
    for i in range(blocks):
      stride = 2 if (stage > 0 and i == 0) else 1
      out_side = side // stride
      flops += conv(side, 1, inplanes, planes) + conv(side, 3, planes, planes)
      flops += conv(out_side, 1, planes, planes * 4)
      if stride > 1 or inplanes != planes * 4:
        flops += conv(out_side, 1, inplanes, planes * 4)
      inplanes, side = planes * 4, out_side
  channels, tokens = inplanes, side * side + 1
  pool = (2 * channels * channels                        # q of the one (mean) query
          + 2 * 2 * tokens * channels * channels         # k and v of every token
          + 2 * 2 * tokens * channels                    # scores and weighted sum
          + 2 * channels * embed_dim)                    # c_proj
  return batch * flops + batch * pool


def model_flops(model_config: Mapping[str, Any], batch: int, pooled: bool | None = None
                ) -> dict[str, int]:
  """Analytic FLOPs of one training step at global `batch`: forward per tower, loss, total.

  `total` = 3 x (image + text + loss forward): the backward pass costs two matmuls for
  every forward matmul (gradients w.r.t. inputs and weights). Remat recomputation is
  not model work and is not counted (it shows in XLA's count instead). `pooled`: count
  the last transformer block for the pooled token only (the unrolled model's shortcut,
  the default unless `scan_layers`); False gives the textbook count of the whole stack.
  """
  v, t, embed = model_config['vision'], model_config['text'], model_config['embed_dim']
  if pooled is None:
    pooled = not model_config.get('scan_layers', False)
  if v['type'] == 'vit':
    grid = v['image_size'] // v['patch_size']
    tokens = grid * grid + 1
    image = (2 * batch * grid * grid * v['patch_size'] ** 2 * 3 * v['width']
             + _transformer_flops(batch, tokens, v['width'], v['layers'], pooled)
             + 2 * batch * v['width'] * embed)
  else:
    image = _resnet_flops(batch, v['image_size'], v['layers'], v['width'], v['heads'], embed)
  text = (_transformer_flops(batch, t['context_length'], t['width'], t['layers'], pooled)
          + 2 * batch * t['width'] * embed)
  loss = 2 * 2 * batch * batch * embed                  # image->text and text->image logits
  return {'image_forward': image, 'text_forward': text, 'loss_forward': loss,
          'total': 3 * (image + text + loss)}


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of one execution of a compiled (SPMD-partitioned) program, per device."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without cost analysis)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def memory_figures(compiled: Any, device: jax.Device) -> dict[str, int | None]:
  """Per-device bytes: XLA's static plan (arguments + outputs - donated aliases + temps)
  and, where the runtime reports it, the measured peak."""
  out: dict[str, int | None] = {'compiled_peak_bytes': None, 'temp_bytes': None,
                                'argument_bytes': None, 'runtime_peak_bytes': None}
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None
  if mem is not None:
    out['temp_bytes'] = int(mem.temp_size_in_bytes)
    out['argument_bytes'] = int(mem.argument_size_in_bytes)
    out['compiled_peak_bytes'] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and 'peak_bytes_in_use' in stats:
    out['runtime_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


# ---------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class StepSetup:
  """A ready-to-time train step: jitted function, sharded state, device-resident batch."""
  step: Any
  state: Any
  batch: dict[str, jax.Array]
  mesh: Any
  global_batch: int


def synthetic_batch(model_config: Mapping[str, Any], global_batch: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """Random CLIP-normalised images and token ids (with an EOT in every row)."""
  rng = np.random.default_rng(seed)
  size = model_config['vision']['image_size']
  context = model_config['text']['context_length']
  vocab = model_config['text']['vocab_size']
  images = rng.standard_normal((global_batch, size, size, 3), dtype=np.float32)
  texts = rng.integers(1, vocab - 1, (global_batch, context), dtype=np.int32)
  texts[:, -1] = model_config.get('eot_token_id', vocab - 1)
  return {'image': images, 'text': texts}


def setup_step(config: Any, batch_per_device: int) -> StepSetup:
  """Mesh from `config.mesh`, sharded state, jitted step and a device-resident batch."""
  mesh = sharding.mesh_from_config(config.mesh)
  global_batch = batch_per_device * sharding.data_parallel_size(mesh)
  config.batch_size = global_batch
  model = build_model(config.model)
  state, shardings = train_step.create_train_state(config, model, mesh,
                                                   jax.random.key(config.seed))
  step = train_step.make_train_step(config, model, mesh, shardings)
  host = synthetic_batch(config.model, global_batch, config.seed)
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
  return StepSetup(step, state, batch, mesh, global_batch)


def _pipeline_batches(config: Any, mesh: Any):
  """Global batches from the real input pipeline (imports tensorflow)."""
  from clip_jax import data  # pylint: disable=import-outside-toplevel
  iterator = data.make_train_iterator(config)
  for batch in data.prefetch_to_mesh(iterator, mesh):
    yield {key: batch[key] for key in ('image', 'text')}   # the compiled step's inputs


def run_benchmark(config: Any, batch_per_device: int, steps: int = 10, warmup: int = 2,
                  pipeline: bool = False, measure_cpu_peak: bool = True) -> dict[str, Any]:
  """Compiles and times the train step; returns the figures as a JSON-ready dict."""
  setup = setup_step(config, batch_per_device)
  device = setup.mesh.devices.flat[0]
  num_devices = setup.mesh.devices.size

  start = time.perf_counter()
  compiled = setup.step.lower(setup.state, setup.batch).compile()
  compile_s = time.perf_counter() - start

  batches = _pipeline_batches(config, setup.mesh) if pipeline else None
  next_batch = (lambda: next(batches)) if pipeline else (lambda: setup.batch)
  state = setup.state
  times = []
  for i in range(warmup + steps):
    batch = next_batch()
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  loss = float(metrics['loss'])

  median = statistics.median(times)
  flops = model_flops(config.model, setup.global_batch)
  xla_per_device = xla_flops(compiled)
  dtype = str(config.model.get('dtype', 'float32'))
  peak = peak_flops(device, dtype)
  peak_source = 'published' if peak is not None else None
  if peak is None and device.platform == 'cpu' and measure_cpu_peak:
    peak, peak_source = measure_matmul_peak(dtype), 'measured matmul'
  achieved = flops['total'] / median / num_devices
  return {
      'model': config.model.name, 'dtype': dtype,
      'remat_policy': config.model.get('remat_policy', 'none'),
      'scan_layers': bool(config.model.get('scan_layers', False)),
      'attention_impl': config.model.get('attention_impl', 'xla'),
      'loss': config.loss.name, 'device_kind': device.device_kind,
      'platform': device.platform, 'num_devices': num_devices,
      'batch_per_device': batch_per_device, 'global_batch': setup.global_batch,
      'input': 'pipeline' if pipeline else 'synthetic (device-resident)',
      'compile_s': compile_s, 'steps': steps,
      'step_time_median_s': median, 'step_time_min_s': min(times),
      'step_time_max_s': max(times),
      'step_time_iqr_s': (float(np.percentile(times, 75) - np.percentile(times, 25))),
      'images_per_s_total': setup.global_batch / median,
      'images_per_s_per_device': setup.global_batch / median / num_devices,
      'model_flops_per_step': flops['total'], 'model_flops_breakdown': flops,
      'xla_flops_per_step': None if xla_per_device is None else xla_per_device * num_devices,
      'xla_over_model_flops': (None if xla_per_device is None
                               else xla_per_device * num_devices / flops['total']),
      'achieved_flops_per_s_per_device': achieved,
      'peak_flops_per_s_per_device': peak, 'peak_source': peak_source,
      'mfu': None if peak is None else achieved / peak,
      'final_loss': loss,
      **memory_figures(compiled, device),
  }


def _fmt_bytes(n: int | None) -> str:
  return 'n/a' if n is None else f'{n / 2 ** 20:,.1f} MiB'


def format_table(result: Mapping[str, Any]) -> str:
  """A human-readable summary of `run_benchmark`'s dict."""
  mfu = result['mfu']
  rows = [
      ('model', f"{result['model']} ({result['dtype']}, remat={result['remat_policy']}, "
                f"scan={result['scan_layers']}, attention={result['attention_impl']})"),
      ('devices', f"{result['num_devices']} x {result['device_kind']}"),
      ('batch', f"{result['batch_per_device']}/device, {result['global_batch']} global, "
                f"{result['input']}"),
      ('compile', f"{result['compile_s']:.2f} s"),
      ('step time', f"{result['step_time_median_s'] * 1e3:.1f} ms median "
                    f"(min {result['step_time_min_s'] * 1e3:.1f}, max "
                    f"{result['step_time_max_s'] * 1e3:.1f}, IQR "
                    f"{result['step_time_iqr_s'] * 1e3:.1f}) over {result['steps']} steps"),
      ('images/s', f"{result['images_per_s_total']:,.1f} total, "
                   f"{result['images_per_s_per_device']:,.1f} per device"),
      ('model FLOPs/step', f"{result['model_flops_per_step']:.4g}"),
      ('XLA FLOPs/step', 'n/a' if result['xla_flops_per_step'] is None else
       f"{result['xla_flops_per_step']:.4g} ({result['xla_over_model_flops']:.3f} x model)"),
      ('MFU', 'n/a' if mfu is None else
       f"{100 * mfu:.1f}% of {result['peak_flops_per_s_per_device'] / 1e12:.3g} TFLOP/s "
       f"({result['peak_source']})"),
      ('memory/device', f"{_fmt_bytes(result['compiled_peak_bytes'])} compiled plan, "
                        f"{_fmt_bytes(result['runtime_peak_bytes'])} runtime peak"),
  ]
  return '\n'.join(f'{k:18s} {v}' for k, v in rows)


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  cfg = flags.FLAGS.config
  result = run_benchmark(cfg, flags.FLAGS.batch_per_device, flags.FLAGS.steps,
                         flags.FLAGS.warmup, flags.FLAGS.pipeline)
  print(format_table(result))
  line = json.dumps(result)
  print(line)
  if flags.FLAGS.output:
    from clip_jax import storage  # pylint: disable=import-outside-toplevel
    path = storage.write_text(flags.FLAGS.output, line + '\n')
    print(f'wrote {path}')
  sys.stdout.flush()


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py); '
                                  '--config.KEY=VALUE overrides.', lock_config=False)
  flags.DEFINE_integer('batch_per_device', 8, 'Examples per data-parallel device.')
  flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_bool('pipeline', False, 'Feed batches from the input pipeline '
                    '(clip_jax.data; needs tensorflow and config.data).')
  flags.DEFINE_string('output', '', 'Also write the JSON result to this file.')
  flags.mark_flag_as_required('config')


if __name__ == '__main__':
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
