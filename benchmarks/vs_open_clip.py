r"""clip_jax vs open_clip: one optimizer step at a time, same model, batch and precision.

  python benchmarks/vs_open_clip.py --model=ViT-B/32 --batch=32 --steps=10 --rounds=3

Both frameworks train the same architecture (open_clip's `CLIP(embed_dim, vision_cfg,
text_cfg, quick_gelu=True)` built from clip_jax's architecture table) in one process on
the same machine: open_clip with `ClipLoss(local_loss=True, gather_with_grad=True)`,
AdamW (0.9, 0.98, eps 1e-6, decay 0.2 on weights only), global-norm clipping at 1.0 and
the temperature clamp of its training loop; clip_jax with its jitted, donated train
step (`clip_jax.train_step`) and the same recipe (`clip_jax.config`). Batches are
synthetic and already on the device for both. Precision follows `--set dtype=...`:
float32, or bfloat16 compute with float32 weights (torch autocast = open_clip's
`amp_bf16`). On a GPU host both run on the GPU (`--set dtype=bfloat16`, e.g. ViT-B/16
at the largest batch that fits both); this path has not been run here (no GPU).

To keep machine noise from favouring either side the two run interleaved: `--rounds`
rounds of `--steps` steps each, alternating which framework goes first; the reported
time of each is the median over all its timed steps (the first step of every block is
dropped: it can meet the other framework's thread pool still spinning down).

On a machine shared with other jobs, OpenMP's spinning barriers make PyTorch's
multi-threaded step many times slower (seen here: tiny 1.2-8.9 s per step with 2
threads, 0.16-0.3 s with 1, under a load average of 15 on 2 cores), which would flatter
clip_jax; pin both to one core there (`taskset -c 0 ... --torch_threads=1`).

The last line is `ratio clip_jax/open_clip step time: X.XX` (below 1: clip_jax faster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402  (after the path set-up, so the checkout is imported)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clip_jax import benchmark  # noqa: E402
from clip_jax import config as base_config  # noqa: E402


def build_open_clip(model_config: Any) -> torch.nn.Module:
  """open_clip's CLIP with the architecture of a clip_jax model config (ViT towers)."""
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # pylint: disable=import-outside-toplevel
  v, t = model_config.vision, model_config.text
  if v.type != 'vit':
    raise ValueError(f'--model: {model_config.name} has a {v.type} image tower; this script '
                     'compares ViT models')
  vision_cfg = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads,
                             patch_size=v.patch_size, image_size=v.image_size)
  text_cfg = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size,
                         width=t.width, heads=t.heads, layers=t.layers)
  return CLIP(model_config.embed_dim, vision_cfg, text_cfg,
              quick_gelu=model_config.activation == 'quick_gelu')


def open_clip_step(config: Any, batch: dict[str, np.ndarray], device: str
                   ) -> Callable[[], float]:
  """A closure running one open_clip training step (open_clip_train's recipe).

  With `config.model.dtype == 'bfloat16'` the forward runs under `torch.autocast`
  (bfloat16 compute, float32 master weights: open_clip's `--precision amp_bf16`).
  """
  from open_clip.loss import ClipLoss  # pylint: disable=import-outside-toplevel
  torch.manual_seed(config.seed)
  model = build_open_clip(config.model).to(device)
  model.train()
  # open_clip_train.main: no decay for gains, biases, ndim < 2 and logit_scale.
  exclude = lambda n, p: p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
  named = list(model.named_parameters())
  oc = config.optim
  optimizer = torch.optim.AdamW(
      [{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0},
       {'params': [p for n, p in named if not exclude(n, p)], 'weight_decay': oc.weight_decay}],
      lr=oc.learning_rate, betas=(oc.b1, oc.b2), eps=oc.eps)
  loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=1)
  images = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous().to(device)  # NCHW
  texts = torch.from_numpy(batch['text']).long().to(device)
  bf16 = config.model.get('dtype', 'float32') == 'bfloat16'
  max_scale = math.log(100.0)

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=bf16):
      image_features, text_features, logit_scale = model(images, texts)[:3]
      loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip_norm, norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, max_scale)
    return float(loss.detach())    # a host read: waits for the step, as jax's block
  return step


def clip_jax_step(config: Any, batch_size: int) -> tuple[Callable[[], float], float]:
  """A closure running one clip_jax training step, and its compile time in seconds."""
  setup = benchmark.setup_step(config, batch_size)
  start = time.perf_counter()
  compiled = setup.step.lower(setup.state, setup.batch).compile()
  compile_s = time.perf_counter() - start
  holder = {'state': setup.state}

  def step() -> float:
    holder['state'], metrics = compiled(holder['state'], setup.batch)
    jax.block_until_ready((holder['state'], metrics))
    return 0.0
  return step, compile_s


def time_block(step: Callable[[], Any], steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times[1:]      # the first step of a block can meet the other side's threads


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='tiny', help='architecture name (ViT models)')
  parser.add_argument('--batch', type=int, default=32, help='global batch of both')
  parser.add_argument('--steps', type=int, default=6, help='steps per block (first dropped)')
  parser.add_argument('--rounds', type=int, default=3, help='alternating blocks per framework')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='clip_jax model option, e.g. --set scan_layers=True')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch.set_num_threads (0: torch default). On a shared machine '
                      'run `taskset -c 0 ... --torch_threads=1` for a one-core comparison '
                      '(JAX sizes its thread pool from the CPU affinity)')
  parser.add_argument('--output', default='', help='also write the JSON result here')
  args = parser.parse_args()

  if jax.device_count() != 1:
    raise SystemExit(f'vs_open_clip: expected one JAX device (open_clip runs on one), found '
                     f'{jax.device_count()}; unset --xla_force_host_platform_device_count')
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  overrides = {}
  for item in args.set:
    key, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'--set: expected KEY=VALUE, got {item!r}')
    overrides[key] = {'True': True, 'False': False}.get(value, value)
  config = base_config.get_config(args.model, **overrides)
  dtype = config.model.get('dtype', 'float32')
  if dtype not in ('float32', 'bfloat16'):
    raise SystemExit(f'--set dtype: expected float32 or bfloat16, got {dtype!r}')
  # The same kind of device for both: a GPU when JAX has one (and torch sees CUDA).
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  host_batch = benchmark.synthetic_batch(config.model, args.batch, config.seed)

  torch_step = open_clip_step(config, host_batch, device)
  jax_step, compile_s = clip_jax_step(config, args.batch)
  torch_step()
  jax_step()                                       # warm-up: allocator, caches
  times: dict[str, list[float]] = {'clip_jax': [], 'open_clip': []}
  for r in range(args.rounds):
    order = [('clip_jax', jax_step), ('open_clip', torch_step)]
    for name, fn in (order if r % 2 == 0 else order[::-1]):
      times[name] += time_block(fn, args.steps)

  medians = {k: statistics.median(v) for k, v in times.items()}
  result = {
      'model': config.model.name, 'batch': args.batch, 'precision': dtype,
      'device': device, 'jax_device': jax.devices()[0].device_kind,
      'jax_overrides': overrides, 'clip_jax_compile_s': compile_s,
      'torch_threads': torch.get_num_threads(), 'cpus_allowed': len(os.sched_getaffinity(0)),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      **{f'{k}_step_s_median': m for k, m in medians.items()},
      **{f'{k}_step_s_all': v for k, v in times.items()},
      **{f'{k}_images_per_s': args.batch / m for k, m in medians.items()},
      'ratio': medians['clip_jax'] / medians['open_clip'],
  }
  line = json.dumps(result)
  print(line)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(line + '\n')
    print(f'wrote {args.output}')
  for name in ('clip_jax', 'open_clip'):
    print(f'{name:10s} {medians[name] * 1e3:8.1f} ms/step  '
          f'{args.batch / medians[name]:8.1f} images/s  (median of {len(times[name])} steps)')
  print(f"ratio clip_jax/open_clip step time: {result['ratio']:.2f}")


if __name__ == '__main__':
  main()
