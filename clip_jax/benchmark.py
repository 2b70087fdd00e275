r"""Training-step benchmark: compile time, step time, images/s, model FLOPs, MFU, memory.

  python -m clip_jax.benchmark --config=configs/vit_b16.py --batch_per_device=256 \
      --steps=20 --config.model.dtype=bfloat16

Times the trainer's jitted, donated train step (`clip_jax.train_step`) on synthetic,
device-resident batches after warm-up (`--pipeline` feeds it from the real input
pipeline instead, which needs tensorflow and `config.data`). Prints a table, then
one JSON line; `--output=FILE` also writes the JSON.

The step is that of the first stage of `config.train.stages` (by default the model's
own settings); `--mask_ratio` (FLIP patch masking), `--image_size` and `--text_length`
(CLIPA's reduced stages) replace its settings, e.g. `--mask_ratio=0.5` or
`--image_size=112 --text_length=32`.

Model FLOPs, XLA's count and the peak behind MFU come from `clip_jax.flops`, which the
trainer's logged MFU uses too; on CPU, where no published peak applies, the peak is
measured with a large jitted matmul. The input pipeline alone is measured by
`python -m clip_jax.data.throughput`.

Nothing here imports tensorflow unless `--pipeline` is given.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from clip_jax import config as config_lib
from clip_jax import sharding, train_step
from clip_jax.flops import measure_matmul_peak, model_flops, peak_flops, xla_flops
from clip_jax.models.clip import build_model


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
  mesh: Any                  # sharding.MeshLayout
  global_batch: int
  stage: config_lib.Stage    # the mask ratio, image size and text length it runs at


def benchmark_stage(config: Any, mask_ratio: float | None = None, image_size: int | None = None,
                    text_length: int | None = None) -> config_lib.Stage:
  """The first stage of config.train.stages with the given settings replaced, validated
  as the trainer validates a stage."""
  first = config_lib.training_stages(config)[0]
  stage = config_lib.Stage(
      config.total_steps, first.mask_ratio if mask_ratio is None else mask_ratio,
      first.image_size if image_size is None else image_size,
      first.text_length if text_length is None else text_length)
  config.train.stages = ((stage.until_step, stage.mask_ratio, stage.image_size,
                          stage.text_length),)
  try:
    return config_lib.training_stages(config)[0]
  except ValueError as error:
    raise ValueError(f'--mask_ratio / --image_size / --text_length: {error}') from error


def synthetic_batch(model_config: Mapping[str, Any], global_batch: int, seed: int = 0,
                    image_size: int | None = None, text_length: int | None = None
                    ) -> dict[str, np.ndarray]:
  """Random CLIP-normalised images and token ids (with an EOT in every row), at the
  model's image size and context length unless others are given."""
  rng = np.random.default_rng(seed)
  size = image_size or model_config['vision']['image_size']
  context = text_length or model_config['text']['context_length']
  vocab = model_config['text']['vocab_size']
  images = rng.standard_normal((global_batch, size, size, 3), dtype=np.float32)
  texts = rng.integers(1, vocab - 1, (global_batch, context), dtype=np.int32)
  texts[:, -1] = model_config.get('eot_token_id', vocab - 1)
  return {'image': images, 'text': texts}


def setup_step(config: Any, batch_per_device: int, stage: config_lib.Stage | None = None
               ) -> StepSetup:
  """Mesh from `config.mesh`, sharded state, the trainer's jitted step for `stage`
  (default: `benchmark_stage(config)`) and a device-resident batch at its sizes."""
  stage = benchmark_stage(config) if stage is None else stage
  mesh = sharding.layout_from_config(config.mesh)
  global_batch = batch_per_device * sharding.data_parallel_size(mesh)
  config.batch_size = global_batch
  model = build_model(config.model)
  state, shardings = train_step.create_train_state(config, model, mesh,
                                                   jax.random.key(config.seed))
  step = train_step.make_train_step(config, model, mesh, shardings,
                                    mask_ratio=stage.mask_ratio)
  host = synthetic_batch(config.model, global_batch, config.seed, stage.image_size,
                         stage.text_length)
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
  return StepSetup(step, state, batch, mesh, global_batch, stage)


def _pipeline_batches(config: Any, mesh: Any, stage: config_lib.Stage):
  """Global batches from the real input pipeline at the stage's sizes (imports tensorflow)."""
  from clip_jax import data  # pylint: disable=import-outside-toplevel
  iterator = data.make_train_iterator(config, image_size=stage.image_size,
                                      text_length=stage.text_length)
  for batch in data.prefetch_to_mesh(iterator, mesh):
    yield {key: batch[key] for key in ('image', 'text')}   # the compiled step's inputs


def run_benchmark(config: Any, batch_per_device: int, steps: int = 10, warmup: int = 2,
                  pipeline: bool = False, measure_cpu_peak: bool = True,
                  stage: config_lib.Stage | None = None) -> dict[str, Any]:
  """Compiles and times the train step of `stage` (default: `benchmark_stage(config)`);
  returns the figures as a JSON-ready dict."""
  setup = setup_step(config, batch_per_device, stage)
  stage = setup.stage
  device = setup.mesh.mesh.devices.flat[0]
  num_devices = setup.mesh.mesh.devices.size

  start = time.perf_counter()
  compiled = setup.step.lower(setup.state, setup.batch).compile()
  compile_s = time.perf_counter() - start

  batches = _pipeline_batches(config, setup.mesh, stage) if pipeline else None
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
  flops = model_flops(config.model, setup.global_batch, mask_ratio=stage.mask_ratio,
                      image_size=stage.image_size, text_length=stage.text_length)
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
      'mask_ratio': stage.mask_ratio, 'image_size': stage.image_size,
      'text_length': stage.text_length,
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
      ('stage', f"mask {result['mask_ratio']}, {result['image_size']} px, "
                f"{result['text_length']} tokens"),
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


STAGE_FLAGS = ('mask_ratio', 'image_size', 'text_length')   # as benchmark_stage's arguments


def stage_from_flags(config: Any, values: Any) -> config_lib.Stage:
  """The stage the flags ask for; a negative flag (the default) keeps the config's."""
  return benchmark_stage(config, *(None if values[name].value < 0 else values[name].value
                                   for name in STAGE_FLAGS))


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  cfg, given = flags.FLAGS.config, flags.FLAGS
  result = run_benchmark(cfg, given.batch_per_device, given.steps, given.warmup,
                         given.pipeline, stage=stage_from_flags(cfg, given))
  print(format_table(result))
  line = json.dumps(result)
  print(line)
  if flags.FLAGS.output:
    from clip_jax import storage  # pylint: disable=import-outside-toplevel
    path = storage.write_text(flags.FLAGS.output, line + '\n')
    print(f'wrote {path}')
  sys.stdout.flush()


def define_flags(values: Any = None) -> None:
  """The CLI's flags, on absl's global FLAGS or on the FlagValues `values`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  on = dict(flag_values=flags.FLAGS if values is None else values)
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py); '
                                  '--config.KEY=VALUE overrides.', lock_config=False, **on)
  flags.DEFINE_integer('batch_per_device', 8, 'Examples per data-parallel device.', **on)
  flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).', **on)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.', **on)
  flags.DEFINE_bool('pipeline', False, 'Feed batches from the input pipeline '
                    '(clip_jax.data; needs tensorflow and config.data).', **on)
  flags.DEFINE_string('output', '', 'Also write the JSON result to this file.', **on)
  flags.DEFINE_float('mask_ratio', -1.0, "Share of image patches dropped (FLIP); -1 = the "
                     "config's (config.train.stages[0] or config.model.vision.mask_ratio).",
                     **on)
  flags.DEFINE_integer('image_size', -1, "Training image size (CLIPA's reduced stages); "
                       "-1 = the config's.", **on)
  flags.DEFINE_integer('text_length', -1, "Text tokens per caption; -1 = the config's.", **on)
  flags.mark_flag_as_required('config', **on)


if __name__ == '__main__':
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
