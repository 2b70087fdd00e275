"""OpenAI's (and open_clip's) CLIP state-dict layout <-> clip_jax variables.

Key names and shapes are exactly those of `clip.model.CLIP` / `open_clip.CLIP`:
the text tower's keys are top level (`token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.{i}.*`, `ln_final.*`, `text_projection`), the image tower's
under `visual.`; attention uses `nn.MultiheadAttention`'s fused `in_proj_weight`.

Tensors with no clip_jax variable are handled so that import -> export gives back
the state dict bit for bit: BatchNorm `num_batches_tracked` and any `attn_mask`
buffer are carried (written back from the import, or as zeros for models trained
here). `input_resolution`, `context_length` and `vocab_size`, which only OpenAI's
TorchScript archives hold, are dropped as OpenAI's `build_model` and open_clip do
(the shapes say the same).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from clip_jax.convert.mapping import Entry, norm, prefixed

CARRIED = re.compile(r'(^|\.)attn_mask$|\.num_batches_tracked$')
DROPPED = re.compile(r'^(input_resolution|context_length|vocab_size)$')


# One residual attention block: (PyTorch key suffixes, clip_jax name suffix, kind).
BLOCK = (
    (('ln_1.weight',), 'ln_1/scale', 'copy'),
    (('ln_1.bias',), 'ln_1/bias', 'copy'),
    (('attn.in_proj_weight',), 'attn/qkv/kernel', 'fused_qkv_kernel'),
    (('attn.in_proj_bias',), 'attn/qkv/bias', 'fused_qkv_bias'),
    (('attn.out_proj.weight',), 'attn/out/kernel', 'heads_out_kernel'),
    (('attn.out_proj.bias',), 'attn/out/bias', 'copy'),
    (('ln_2.weight',), 'ln_2/scale', 'copy'),
    (('ln_2.bias',), 'ln_2/bias', 'copy'),
    (('mlp.c_fc.weight',), 'mlp/c_fc/kernel', 'linear'),
    (('mlp.c_fc.bias',), 'mlp/c_fc/bias', 'copy'),
    (('mlp.c_proj.weight',), 'mlp/c_proj/kernel', 'linear'),
    (('mlp.c_proj.bias',), 'mlp/c_proj/bias', 'copy'),
)


def _block(torch_prefix: str, flax_prefix: str) -> list[Entry]:
  return prefixed(BLOCK, torch_prefix, 'params/' + flax_prefix)


def _batch_norm(torch_prefix: str, flax_prefix: str) -> list[Entry]:
  return norm(torch_prefix, flax_prefix) + [
      Entry((torch_prefix + 'running_mean',), f'batch_stats/{flax_prefix}/mean', 'copy'),
      Entry((torch_prefix + 'running_var',), f'batch_stats/{flax_prefix}/var', 'copy')]


def _conv(torch_key: str, flax_prefix: str) -> Entry:
  return Entry((torch_key,), f'params/{flax_prefix}/kernel', 'conv')


def _dense(torch_prefix: str, flax_prefix: str) -> list[Entry]:
  return [Entry((torch_prefix + 'weight',), f'params/{flax_prefix}/kernel', 'linear'),
          Entry((torch_prefix + 'bias',), f'params/{flax_prefix}/bias', 'copy')]


def _vit(v: Mapping[str, Any]) -> list[Entry]:
  entries = [
      Entry(('visual.class_embedding',), 'params/visual/class_embedding', 'copy'),
      Entry(('visual.positional_embedding',), 'params/visual/positional_embedding', 'copy'),
      Entry(('visual.proj',), 'params/visual/proj', 'copy'),
      _conv('visual.conv1.weight', 'visual/conv1'),
      *norm('visual.ln_pre.', 'visual/ln_pre'),
  ]
  for i in range(v['layers']):
    entries += _block(f'visual.transformer.resblocks.{i}.', f'visual/transformer/resblocks_{i}/')
  return entries + norm('visual.ln_post.', 'visual/ln_post')


def _resnet(v: Mapping[str, Any]) -> list[Entry]:
  entries = []
  for j in (1, 2, 3):
    entries += [_conv(f'visual.conv{j}.weight', f'visual/conv{j}'),
                *_batch_norm(f'visual.bn{j}.', f'visual/bn{j}')]
  for stage, blocks in enumerate(v['layers'], start=1):
    for i in range(blocks):
      t, f = f'visual.layer{stage}.{i}.', f'visual/layer{stage}_{i}'
      for j in (1, 2, 3):
        entries += [_conv(f'{t}conv{j}.weight', f'{f}/conv{j}'),
                    *_batch_norm(f'{t}bn{j}.', f'{f}/bn{j}')]
      # The first block of every stage changes the width. OpenAI's downsample is a
      # Sequential named '-1' (the parameter-free average pool), '0' (the 1x1 conv)
      # and '1' (its BatchNorm).
      if i == 0:
        entries += [_conv(f'{t}downsample.0.weight', f'{f}/downsample_conv'),
                    *_batch_norm(f'{t}downsample.1.', f'{f}/downsample_bn')]
  entries.append(Entry(('visual.attnpool.positional_embedding',),
                       'params/visual/attnpool/positional_embedding', 'copy'))
  for proj in ('k_proj', 'q_proj', 'v_proj', 'c_proj'):
    entries += _dense(f'visual.attnpool.{proj}.', f'visual/attnpool/{proj}')
  return entries


def entries(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> list[Entry]:
  """Every OpenAI-layout tensor of a model config, in open_clip's `state_dict()` order."""
  out = [Entry(('positional_embedding',), 'params/text/positional_embedding', 'copy'),
         Entry(('text_projection',), 'params/text/text_projection', 'copy'),
         Entry(('logit_scale',), 'params/logit_scale', 'copy')]
  out += _vit(cfg['vision']) if cfg['vision']['type'] == 'vit' else _resnet(cfg['vision'])
  for i in range(cfg['text']['layers']):
    out += _block(f'transformer.resblocks.{i}.', f'text/transformer/resblocks_{i}/')
  out.append(Entry(('token_embedding.weight',), 'params/text/token_embedding', 'copy'))
  return out + norm('ln_final.', 'text/ln_final')


def ignored(key: str) -> bool:
  """Keys with no clip_jax variable that a valid state dict may hold."""
  return bool(CARRIED.search(key) or DROPPED.match(key))


def with_buffers(tensors: Mapping[str, np.ndarray], carried: Mapping[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
  """Adds `num_batches_tracked` after each BatchNorm's running_var (carried, else 0) and
  the carried `attn_mask` buffers, so that open_clip loads the result with strict=True."""
  out = {}
  for key, value in tensors.items():
    out[key] = value
    if key.endswith('.running_var'):
      counter = key[:-len('running_var')] + 'num_batches_tracked'
      out[counter] = np.asarray(carried.get(counter, np.zeros((), np.int64)))
  for key, value in carried.items():
    if key not in out and CARRIED.search(key):
      out[key] = np.asarray(value)
  return out
