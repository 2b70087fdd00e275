r"""Train-step speed of FLIP masking and CLIPA's reduced resolution, side by side in one run.

  python benchmarks/stage_speed.py                              # ViT-B/16, batch 8, float32
  python benchmarks/stage_speed.py --model=ViT-B/16 --batch_per_device=256 --dtype=bfloat16

One train state, one compiled step per variant (the trainer's `make_train_step` with its
stage's mask ratio, on synthetic batches at the stage's image size), timed interleaved:
`--rounds` rounds of `--steps` steps of every variant, the variant order rotating each
round, the first step of every block dropped; each variant's time is the median of its
timed steps. The variants are what `config.train.stages` runs:

  224 px, mask 0     the plain step (the reference of the ratios)
  224 px, mask 0.5   FLIP's pre-training (half of the patches)
  224 px, mask 0.75  FLIP's most aggressive ratio
  112 px, mask 0     a CLIPA stage (the position embedding interpolated to the 7x7 grid)

(sizes follow the model's own image size: full and half). The last line is a JSON list
of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-B/16')
  parser.add_argument('--batch_per_device', type=int, default=8)
  parser.add_argument('--dtype', default='float32', help='float32 | bfloat16')
  parser.add_argument('--steps', type=int, default=3, help='steps per variant per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--layers', type=int, default=0,
                      help='cut both towers to this depth (0: the model\'s own)')
  args = parser.parse_args()

  import jax
  from clip_jax import config as config_lib
  from clip_jax import sharding, train_step
  from clip_jax.benchmark import synthetic_batch
  from clip_jax.flops import model_flops
  from clip_jax.models.clip import build_model
  from clip_jax.optim import make_optimizer

  config = config_lib.get_config(args.model, dtype=args.dtype)
  if args.layers:
    config.model.vision.layers = config.model.text.layers = args.layers
  layout = sharding.layout_from_config(config.mesh)
  global_batch = args.batch_per_device * layout.data_parallel_size
  config.batch_size = global_batch
  full = config.model.vision.image_size
  context = config.model.text.context_length
  variants = [(full, 0.0), (full, 0.5), (full, 0.75), (full // 2, 0.0)]

  model = build_model(config.model)
  tx = make_optimizer(config)
  state, shardings = train_step.create_train_state(config, model, layout,
                                                   jax.random.key(config.seed), tx)
  steps, batches, compile_s = {}, {}, {}
  for size, mask in variants:
    host = synthetic_batch(config.model, global_batch, config.seed, image_size=size)
    batch = {k: jax.device_put(v, sharding.batch_sharding(layout, v.ndim))
             for k, v in host.items()}
    step = train_step.make_train_step(config, model, layout, shardings, tx, mask_ratio=mask)
    start = time.perf_counter()
    steps[size, mask] = step.lower(state, batch).compile()
    compile_s[size, mask] = time.perf_counter() - start
    batches[size, mask] = batch
    print(f'compiled {size} px, mask {mask} in {compile_s[size, mask]:.1f}s', flush=True)

  times = {v: [] for v in variants}
  for round_index in range(args.rounds):
    order = variants[round_index % len(variants):] + variants[:round_index % len(variants)]
    for variant in order:
      for i in range(args.steps + 1):
        start = time.perf_counter()
        state, metrics = steps[variant](state, batches[variant])
        jax.block_until_ready(metrics)
        if i:   # the first step of a block meets the previous variant's tail
          times[variant].append(time.perf_counter() - start)

  base_time = statistics.median(times[variants[0]])
  rows = []
  print(f'\n{args.model} ({args.dtype}), global batch {global_batch} on '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), {args.rounds} rounds x '
        f'{args.steps} steps, medians')
  print('| image size | mask | step time | images/s | speed vs 224 px mask 0 | model GFLOPs/step |')
  print('|---|---|---|---|---|---|')
  for size, mask in variants:
    median = statistics.median(times[size, mask])
    flops = model_flops(config.model, global_batch, mask_ratio=mask, image_size=size,
                        text_length=context)
    row = dict(image_size=size, mask_ratio=mask, step_s=median,
               images_per_s=global_batch / median, speedup=base_time / median,
               model_gflops=flops['total'] / 1e9, compile_s=compile_s[size, mask])
    rows.append(row)
    print(f"| {size} | {mask} | {median * 1e3:.0f} ms | {row['images_per_s']:.1f} | "
          f"{row['speedup']:.2f}x | {row['model_gflops']:.0f} |")
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
