r"""Per-device temporary memory of the contrastive losses, forward + backward: gather vs ring,
softmax (CLIP) and sigmoid (SigLIP).

  python benchmarks/loss_memory.py                       # both tables below (CPU is enough)
  python benchmarks/loss_memory.py --devices=8 --batches=4096,16384,65536 --dim=512

Nothing is run or allocated: each variant is compiled on abstract inputs
(`jit(value_and_grad(loss)).lower(ShapeDtypeStructs).compile()`) for fake CPU devices and
XLA's memory plan (`compiled.memory_analysis().temp_size_in_bytes`, per device, the
buffers the program needs besides its inputs and outputs) is printed.

Table 1: 8 devices, global batch 4k / 16k / 64k (per-device batch grows with it).
Table 2: per-device batch fixed (512), devices 8 / 32 / 128, so the global batch is again
4k / 16k / 64k: the all-gather losses grow with the global batch, the ring losses stay flat.
Each device count needs its own process (XLA fixes the device count at start-up), so
the script runs itself once per count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {'gather': 'softmax', 'ring': 'ring', 'gather sigmoid': 'sigmoid',
            'ring sigmoid': 'ring_sigmoid'}     # row label: config.loss.name


def measure(devices: int, batches: list[int], dim: int) -> list[dict]:
  """Compiles the loss for each variant and global batch; returns one row per pair."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={devices}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import ml_collections

  from clip_jax import losses
  from clip_jax.sharding import batch_sharding, make_mesh, replicated

  mesh = make_mesh((devices, 1, 1))
  rows = []
  for variant, name in VARIANTS.items():
    config = ml_collections.ConfigDict(dict(name=name, sigmoid_bias_init=-10.0))
    loss = losses.make_loss(config, mesh)
    # Gradients w.r.t. both feature matrices, the temperature and the loss's own
    # parameters (the sigmoid losses' bias).
    fn = jax.jit(jax.value_and_grad(lambda x, y, s, p: loss(x, y, s, p)[0],
                                    argnums=(0, 1, 2, 3)))
    params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated(mesh)),
        losses.init_loss_params(config))
    for batch in batches:
      features = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sharding(mesh, 2))
      scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(mesh))
      memory = fn.lower(features, features, scale, params).compile().memory_analysis()
      rows.append(dict(variant=variant, devices=devices, global_batch=batch,
                       local_batch=batch // devices, dim=dim,
                       temp_mib=memory.temp_size_in_bytes / 2 ** 20))
  return rows


def _in_subprocess(devices: int, batches: list[int], dim: int) -> list[dict]:
  cmd = [sys.executable, os.path.abspath(__file__), f'--devices={devices}',
         f'--batches={",".join(map(str, batches))}', f'--dim={dim}', '--json']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith('{')]


def _table(title: str, rows: list[dict]) -> str:
  lines = [title, '', '| variant | devices | global batch | per-device batch | temp MiB / device |',
           '|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['variant']} | {r['devices']} | {r['global_batch']:,} | "
                 f"{r['local_batch']:,} | {r['temp_mib']:,.1f} |")
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--devices', type=int, default=0,
                      help='one table for this many fake devices (default: both tables)')
  parser.add_argument('--batches', default='4096,16384,65536', help='global batch sizes')
  parser.add_argument('--local_batch', type=int, default=512,
                      help='table 2: per-device batch kept fixed while devices grow')
  parser.add_argument('--device_counts', default='8,32,128', help='table 2: device counts')
  parser.add_argument('--dim', type=int, default=512, help='embedding width (ViT-B: 512)')
  parser.add_argument('--json', action='store_true', help='print one JSON line per row')
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(',')]
  if args.devices:
    rows = measure(args.devices, batches, args.dim)
    for r in rows:
      print(json.dumps(r) if args.json else r)
    return
  table1 = _in_subprocess(8, batches, args.dim)
  table2 = []
  for count in (int(c) for c in args.device_counts.split(',')):
    table2 += [r for r in _in_subprocess(count, [count * args.local_batch], args.dim)]
  order = list(VARIANTS)
  table2.sort(key=lambda r: (order.index(r['variant']), r['devices']))
  print(_table(f'Loss forward+backward, 8 devices, embedding width {args.dim}:', table1))
  print()
  print(_table(f'Fixed per-device batch {args.local_batch}, embedding width {args.dim}:',
               table2))
  print('\n(compiled.memory_analysis().temp_size_in_bytes per device; written nowhere)')


if __name__ == '__main__':
  main()
