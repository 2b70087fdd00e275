"""FLOPs of a training step, and the peak a device could run them at (for MFU).

One home for the count, so the trainer's logged MFU and `python -m clip_jax.benchmark`'s
agree by construction. Model FLOPs are counted from the architecture (every matmul and
convolution of both towers and the loss; a training step is 3x the forward: forward,
and two matmuls per forward matmul in the backward pass), independent of remat.
`xla_flops` reads XLA's own count of a compiled program (`compiled.cost_analysis()`,
which also counts elementwise work, the optimizer and the recomputation remat adds)
to cross-check it. MFU = model FLOPs per second / the device's peak (dense, from
`PEAK_FLOPS`); on CPU, where no published peak applies, `measure_matmul_peak` measures
one with a large jitted matmul.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from clip_jax.models.resnet import refuse_masking
from clip_jax.models.vit import kept_patches

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


def model_flops(model_config: Mapping[str, Any], batch: int, pooled: bool | None = None,
                mask_ratio: float = 0.0, image_size: int | None = None,
                text_length: int | None = None) -> dict[str, int]:
  """Analytic FLOPs of one training step at global `batch`: forward per tower, loss, total.

  `total` = 3 x (image + text + loss forward): the backward pass costs two matmuls for
  every forward matmul (gradients w.r.t. inputs and weights). Remat recomputation is
  not model work and is not counted (it shows in XLA's count instead). `pooled`: count
  the last transformer block for the pooled token only (the unrolled model's shortcut,
  the default unless `scan_layers`); False gives the textbook count of the whole stack.

  What a training stage runs: `mask_ratio` (FLIP) counts the ViT encoder on the class
  token and the kept patches (the patch embedding still sees every patch);
  `image_size` (square, pixels) and `text_length` (tokens) replace the model's own
  `vision.image_size` and `text.context_length` (None: the model's).
  """
  v, t, embed = model_config['vision'], model_config['text'], model_config['embed_dim']
  if pooled is None:
    pooled = not model_config.get('scan_layers', False)
  image_size = v['image_size'] if image_size is None else image_size
  text_length = t['context_length'] if text_length is None else text_length
  if v['type'] == 'vit':
    patches = (image_size // v['patch_size']) ** 2
    tokens = kept_patches(patches, mask_ratio) + 1              # mask 0 keeps them all
    image = (2 * batch * patches * v['patch_size'] ** 2 * 3 * v['width']
             + _transformer_flops(batch, tokens, v['width'], v['layers'], pooled)
             + 2 * batch * v['width'] * embed)
  else:
    refuse_masking(mask_ratio)
    image = _resnet_flops(batch, image_size, v['layers'], v['width'], v['heads'], embed)
  text = (_transformer_flops(batch, text_length, t['width'], t['layers'], pooled)
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
