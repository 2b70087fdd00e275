r"""What FLIP's patch masking buys on the embedded default: equal steps and equal wall clock.

  python benchmarks/flip_learning.py                      # 3 seeds, 300 steps (~30 min on 2 cores)
  python benchmarks/flip_learning.py --seeds=0 --steps=20 # a quick look

Each run is the README's default command (`python -m clip_jax.main`: configs/tiny.py on
the built-in scenes) from its own workdir, with `--config.seed` and a stage schedule:

  unmasked          the default: every step sees every patch;
  flip_equal_steps  FLIP: the first 90% of the steps drop half of the patches
                    (`config.train.stages`, mask 0.5), the last 10% tune unmasked;
  flip_equal_time   the same schedule over more steps: as many as the unmasked run's
                    training time holds at the masked step's measured speed (the ratio of
                    the two runs' images/s with the first seed, taken in this same run).

It prints one row per run (the three learning metrics of the default run, the training
images/s and the wall time) and, per variant, the mean and the spread (min-max) over the
seeds. The built-in data is drawn once and shared (`--config.builtin.dir`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from clip_jax.metrics_writer import IMAGES_PER_SECOND, METRICS_FILE  # noqa: E402

# The default run's last lines (clip_jax.train.zeroshot_summary): metric -> line prefix.
SUMMARY_LINES = {
    'seen_top1': 'zero-shot top-1 on seen pairs, new images: ',
    'captions_r1': 'text->image R@1 on held-out captions: ',
    'heldout_top1': 'zero-shot top-1 on held-out: ',
}
MASK_RATIO = 0.5
TUNING_SHARE = 0.1     # FLIP's unmasked tuning: the last 10% of the steps


def flip_stages(steps: int, image_size: int, text_length: int) -> str:
  """--config.train.stages for masked pre-training then unmasked tuning over `steps`."""
  masked = max(1, round(steps * (1 - TUNING_SHARE)))
  return (f'(({masked},{MASK_RATIO},{image_size},{text_length}),'
          f'({steps},0.0,{image_size},{text_length}))')


def run(name: str, seed: int, steps: int, stages: str | None, root: str) -> dict:
  """One default run; returns its metrics, median images/s and wall time."""
  workdir = os.path.join(root, f'{name}_seed{seed}')
  argv = [sys.executable, '-m', 'clip_jax.main', f'--workdir={workdir}',
          f'--config.seed={seed}', f'--config.total_steps={steps}',
          f'--config.builtin.dir={os.path.join(root, "builtin")}']
  if stages:
    argv.append(f'--config.train.stages={stages}')
  start = time.time()
  done = subprocess.run(argv, capture_output=True, text=True, cwd=root)
  wall = time.time() - start
  if done.returncode:
    raise SystemExit(f'{name} seed {seed} failed:\n{" ".join(argv)}\n{done.stderr[-3000:]}')
  row = {'variant': name, 'seed': seed, 'steps': steps, 'wall_s': wall}
  for key, prefix in SUMMARY_LINES.items():
    match = re.search(re.escape(prefix) + r'([\d.]+)%', done.stdout)
    if not match:
      raise SystemExit(f'{name} seed {seed}: no line {prefix!r} in the output')
    row[key] = float(match.group(1))
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    rates = [r[IMAGES_PER_SECOND] for r in map(json.loads, f) if IMAGES_PER_SECOND in r]
  row['images_per_s'] = statistics.median(rates) if rates else float('nan')
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated config.seed values')
  parser.add_argument('--steps', type=int, default=300, help='the unmasked run\'s steps')
  parser.add_argument('--json', action='store_true', help='also print the rows as JSON')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]

  from clip_jax.config import get_config   # configs/tiny.py's model: image size, context
  model = get_config('tiny').model
  size, length = model.vision.image_size, model.text.context_length

  rows = []
  with tempfile.TemporaryDirectory(prefix='flip_learning_') as root:
    equal_time_steps = None
    for seed in seeds:
      rows.append(run('unmasked', seed, args.steps, None, root))
      rows.append(run('flip_equal_steps', seed, args.steps,
                      flip_stages(args.steps, size, length), root))
      if equal_time_steps is None:   # from the first seed's two runs, side by side
        speedup = rows[-1]['images_per_s'] / rows[-2]['images_per_s']
        equal_time_steps = max(args.steps, round(args.steps * speedup))
        print(f'masked/unmasked images/s: {speedup:.2f} -> equal-time run of '
              f'{equal_time_steps} steps', flush=True)
      rows.append(run('flip_equal_time', seed, equal_time_steps,
                      flip_stages(equal_time_steps, size, length), root))
      for row in rows[-3:]:
        print(json.dumps(row), flush=True) if args.json else None

  metrics = ('seen_top1', 'captions_r1', 'heldout_top1')
  print('| variant | seed | steps | seen-pair top-1 | caption R@1 | held-out top-1 | '
        'images/s | wall |')
  print('|---|---|---|---|---|---|---|---|')
  for row in rows:
    print(f"| {row['variant']} | {row['seed']} | {row['steps']} | "
          + ' | '.join(f'{row[m]:.1f}%' for m in metrics)
          + f" | {row['images_per_s']:.0f} | {row['wall_s']:.0f} s |")
  print()
  print('| variant | seeds | seen-pair top-1 | caption R@1 | held-out top-1 | images/s |')
  print('|---|---|---|---|---|---|')
  for variant in dict.fromkeys(r['variant'] for r in rows):
    group = [r for r in rows if r['variant'] == variant]
    cells = []
    for m in metrics + ('images_per_s',):
      values = [r[m] for r in group]
      unit = '%' if m != 'images_per_s' else ''
      cells.append(f'{statistics.mean(values):.1f}{unit} ({min(values):.1f}-{max(values):.1f})')
    print(f'| {variant} | {len(group)} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
