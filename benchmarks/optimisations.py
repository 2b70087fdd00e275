r"""Before/after measurements of clip_jax's performance options (figures in BENCHMARKS.md).

  python benchmarks/optimisations.py compile   --model=ViT-L/14      # nn.scan vs unrolled
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python benchmarks/optimisations.py compile --model=ViT-L/14 --mesh=1,8,1   # FSDP
  python benchmarks/optimisations.py remat     --model=ViT-B/32 --batch=32
  python benchmarks/optimisations.py dtype     --model=ViT-B/32 --batch=32
  python benchmarks/optimisations.py attention --model=ViT-B/32 --batch=32

compile    compile time of the full train step (abstract inputs: `jit.lower().compile()`
           on ShapeDtypeStructs, nothing allocated) with `scan_layers` False and True.
remat      per remat policy: XLA's memory plan of the train step (`memory_analysis()`:
           temporaries and total per device) and the measured step time.
dtype      float32 vs bfloat16 compute (parameters and Adam state stay float32).
attention  the attention op alone, forward + backward at the model's shapes:
           `jax.nn.dot_product_attention(implementation='xla')` vs clip_jax's
           einsum-softmax-einsum (`clip_jax.models.layers.attention`).
Every mode prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clip_jax import benchmark, flops, sharding, train_step  # noqa: E402
from clip_jax import config as base_config  # noqa: E402
from clip_jax.models.clip import build_model  # noqa: E402
from clip_jax.models.layers import attention  # noqa: E402


def _abstract_step(config: Any, batch: int):
  """(jitted step, abstract state, abstract batch) without allocating parameters."""
  layout = sharding.layout_from_config(config.mesh)
  config.batch_size = batch
  model = build_model(config.model)
  abstract_state, shardings = train_step.train_state_shardings(config, model, layout)
  state = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  step = train_step.make_train_step(config, model, layout, shardings)
  host = benchmark.synthetic_batch(config.model, batch)
  batch_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                         sharding=sharding.batch_sharding(layout, v.ndim))
                 for k, v in host.items()}
  return step, state, batch_specs


def compile_seconds(config: Any, batch: int) -> tuple[float, float]:
  """(lower seconds, compile seconds) of the train step on abstract inputs."""
  step, state, batch_specs = _abstract_step(config, batch)
  start = time.perf_counter()
  lowered = step.lower(state, batch_specs)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  return lower_s, time.perf_counter() - start


def timed_steps(config: Any, batch: int, steps: int) -> tuple[Any, float, list[float]]:
  """(compiled step, compile seconds, step times after one warm-up step)."""
  setup = benchmark.setup_step(config, batch)
  start = time.perf_counter()
  compiled = setup.step.lower(setup.state, setup.batch).compile()
  compile_s = time.perf_counter() - start
  state, times = setup.state, []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, setup.batch)
    jax.block_until_ready((state, metrics))
    if i:
      times.append(time.perf_counter() - start)
  return compiled, compile_s, times


def _emit(record: dict[str, Any]) -> None:
  print(json.dumps(record), flush=True)


def _mesh_shape(text: str) -> tuple[int, ...]:
  parts = text.split(',')
  if len(parts) != 3 or not all(p.strip().lstrip('-').isdigit() for p in parts):
    raise SystemExit(f'--mesh: expected three integers data,fsdp,model (e.g. 1,8,1), got {text!r}')
  return tuple(int(p) for p in parts)


def mode_compile(args) -> None:
  for scan in (True, False):
    config = base_config.get_config(args.model, scan_layers=scan)
    if args.mesh:
      config.mesh.shape = _mesh_shape(args.mesh)
    lower_s, compile_s = compile_seconds(config, args.batch)
    _emit({'mode': 'compile', 'model': args.model, 'batch': args.batch, 'scan_layers': scan,
           'mesh': list(config.mesh.shape), 'devices': jax.device_count(),
           'lower_s': lower_s, 'compile_s': compile_s,
           'lower_and_compile_s': lower_s + compile_s})


def mode_remat(args) -> None:
  for policy in ('none', 'dots', 'save_attn_out', 'full'):
    config = base_config.get_config(args.model, remat_policy=policy, scan_layers=args.scan)
    compiled, compile_s, times = timed_steps(config, args.batch, args.steps)
    memory = benchmark.memory_figures(compiled, jax.devices()[0])
    _emit({'mode': 'remat', 'model': args.model, 'batch': args.batch, 'policy': policy,
           'scan_layers': args.scan, 'compile_s': compile_s,
           'step_s_median': statistics.median(times),
           'xla_flops': flops.xla_flops(compiled), **memory})


def mode_dtype(args) -> None:
  for dtype in ('float32', 'bfloat16'):
    config = base_config.get_config(args.model, dtype=dtype, scan_layers=args.scan)
    compiled, compile_s, times = timed_steps(config, args.batch, args.steps)
    memory = benchmark.memory_figures(compiled, jax.devices()[0])
    _emit({'mode': 'dtype', 'model': args.model, 'batch': args.batch, 'dtype': dtype,
           'compile_s': compile_s, 'step_s_median': statistics.median(times), **memory})


def mode_attention(args) -> None:
  cfg = base_config.get_config(args.model).model
  shapes = []
  if cfg.vision.type == 'vit':
    grid = cfg.vision.image_size // cfg.vision.patch_size
    shapes.append(('image', grid * grid + 1, cfg.vision.heads,
                   cfg.vision.width // cfg.vision.heads, False))
  shapes.append(('text', cfg.text.context_length, cfg.text.heads,
                 cfg.text.width // cfg.text.heads, True))
  impls = {
      'jax.nn.dot_product_attention(xla)': lambda q, k, v, c: jax.nn.dot_product_attention(
          q, k, v, is_causal=c, implementation='xla'),
      'clip_jax einsum-softmax (layers.attention)': lambda q, k, v, c: attention(
          q, k, v, c, 'xla'),
  }
  for tower, tokens, heads, head_dim, causal in shapes:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (args.batch, tokens, heads, head_dim)) for key in keys)
    for name, fn in impls.items():
      loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, causal) ** 2)
      grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      jax.block_until_ready(grad(q, k, v))
      times = []
      for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        times.append(time.perf_counter() - start)
      _emit({'mode': 'attention', 'tower': tower, 'impl': name, 'batch': args.batch,
             'tokens': tokens, 'heads': heads, 'fwd_bwd_s_median': statistics.median(times)})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('mode', choices=('compile', 'remat', 'dtype', 'attention'))
  parser.add_argument('--model', default='ViT-B/32')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--scan', action='store_true', help='scan_layers for remat/dtype')
  parser.add_argument('--mesh', default='', help='compile: mesh shape (data,fsdp,model), e.g. '
                      '1,8,1 with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  args = parser.parse_args()
  {'compile': mode_compile, 'remat': mode_remat, 'dtype': mode_dtype,
   'attention': mode_attention}[args.mode](args)


if __name__ == '__main__':
  main()
