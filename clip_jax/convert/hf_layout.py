"""Hugging Face `transformers.CLIPModel` layout <-> clip_jax variables.

A CLIPModel directory holds `config.json` and `model.safetensors` (or shards listed
in `model.safetensors.index.json`). Its attention has separate q/k/v projections,
which are stacked into clip_jax's fused `qkv` kernel on import and split on export;
the image tower's norms are `pre_layrnorm` (sic) and `post_layernorm`; both
projections are bias-free `nn.Linear`s. Hugging Face has no ModifiedResNet CLIP, so
ResNet models cannot be exported to it.

Text pooling: transformers pools at the argmax of the token ids when
`text_config.eos_token_id == 2` (its configs written before transformers 4.31), else
at the first `eos_token_id`. clip_jax's `text_pool='argmax'` is written as
`eos_token_id: 2`, `'eot_id'` as the model's `eot_token_id`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from clip_jax import storage
from clip_jax.convert.mapping import Entry, norm, prefixed
from clip_jax.convert.safe_load import read_safetensors
from clip_jax.models.architectures import ModelOptions

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
CONFIG_FILE = 'config.json'
# position_ids was a persistent buffer before transformers 4.31 (an arange; not weights).
DROPPED = re.compile(r'(^|\.)position_ids$')


# One encoder layer: (PyTorch key suffixes, clip_jax name suffix, kind).
BLOCK = (
    (tuple(f'self_attn.{p}_proj.weight' for p in 'qkv'), 'attn/qkv/kernel', 'split_qkv_kernel'),
    (tuple(f'self_attn.{p}_proj.bias' for p in 'qkv'), 'attn/qkv/bias', 'split_qkv_bias'),
    (('self_attn.out_proj.weight',), 'attn/out/kernel', 'heads_out_kernel'),
    (('self_attn.out_proj.bias',), 'attn/out/bias', 'copy'),
    (('layer_norm1.weight',), 'ln_1/scale', 'copy'),
    (('layer_norm1.bias',), 'ln_1/bias', 'copy'),
    (('mlp.fc1.weight',), 'mlp/c_fc/kernel', 'linear'),
    (('mlp.fc1.bias',), 'mlp/c_fc/bias', 'copy'),
    (('mlp.fc2.weight',), 'mlp/c_proj/kernel', 'linear'),
    (('mlp.fc2.bias',), 'mlp/c_proj/bias', 'copy'),
    (('layer_norm2.weight',), 'ln_2/scale', 'copy'),
    (('layer_norm2.bias',), 'ln_2/bias', 'copy'),
)


def _block(torch_prefix: str, flax_prefix: str) -> list[Entry]:
  return prefixed(BLOCK, torch_prefix, 'params/' + flax_prefix)


def refuse_resnet(cfg: Mapping[str, Any], what: str) -> None:
  if cfg['vision']['type'] != 'vit':
    raise ValueError(f'{what}: Hugging Face transformers has no ModifiedResNet CLIP, so a '
                     f'{cfg.get("name", "ResNet")} model (config.model.vision.type='
                     f'{cfg["vision"]["type"]!r}) cannot be exported to it; use --format openai '
                     '(open_clip loads it)')


def entries(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> list[Entry]:
  """Every CLIPModel tensor of a (ViT) model config, in CLIPModel's `state_dict()` order."""
  refuse_resnet(cfg, 'Hugging Face layout')
  out = [Entry(('text_model.embeddings.token_embedding.weight',),
               'params/text/token_embedding', 'copy'),
         Entry(('text_model.embeddings.position_embedding.weight',),
               'params/text/positional_embedding', 'copy')]
  for i in range(cfg['text']['layers']):
    out += _block(f'text_model.encoder.layers.{i}.', f'text/transformer/resblocks_{i}/')
  out += norm('text_model.final_layer_norm.', 'text/ln_final')
  out += [Entry(('vision_model.embeddings.class_embedding',), 'params/visual/class_embedding',
                'copy'),
          Entry(('vision_model.embeddings.patch_embedding.weight',), 'params/visual/conv1/kernel',
                'conv'),
          Entry(('vision_model.embeddings.position_embedding.weight',),
                'params/visual/positional_embedding', 'copy')]
  out += norm('vision_model.pre_layrnorm.', 'visual/ln_pre')
  for i in range(cfg['vision']['layers']):
    out += _block(f'vision_model.encoder.layers.{i}.', f'visual/transformer/resblocks_{i}/')
  out += norm('vision_model.post_layernorm.', 'visual/ln_post')
  return out + [Entry(('visual_projection.weight',), 'params/visual/proj', 'linear'),
                Entry(('text_projection.weight',), 'params/text/text_projection', 'linear'),
                Entry(('logit_scale',), 'params/logit_scale', 'copy')]


def ignored(key: str) -> bool:
  return bool(DROPPED.search(key))


def is_hf_directory(path: str | os.PathLike) -> bool:
  """A directory with a CLIPModel config.json (model_type 'clip')."""
  config = storage.join(path, CONFIG_FILE)
  if not storage.is_file(config):
    return False
  try:
    data = json.loads(storage.read_text(config))
  except (OSError, json.JSONDecodeError):
    return False
  return isinstance(data, dict) and (data.get('model_type') == 'clip' or 'vision_config' in data)


def read_directory(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json contents, tensors) of a CLIPModel directory written by save_pretrained."""
  path = storage.resolve(path)
  config_path = path / CONFIG_FILE
  try:
    hf_config = json.loads(storage.read_text(config_path))
  except FileNotFoundError:
    raise FileNotFoundError(f'{config_path}: missing; expected a Hugging Face CLIPModel '
                            'directory (config.json + model.safetensors)') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{config_path}: not valid JSON ({e})') from None
  index = path / INDEX_FILE
  if storage.is_file(path / WEIGHTS_FILE):
    files = [WEIGHTS_FILE]
  elif storage.is_file(index):
    files = list(dict.fromkeys(json.loads(storage.read_text(index))['weight_map'].values()))
  else:
    raise FileNotFoundError(f'{path}: no {WEIGHTS_FILE} or {INDEX_FILE}; only safetensors '
                            'weights are read from Hugging Face directories')
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(read_safetensors(path / name)[0])
  return hf_config, tensors


def config_json(cfg: ml_collections.ConfigDict | Mapping[str, Any], torch_dtype: str
                ) -> dict[str, Any]:
  """The config.json that `transformers.CLIPModel.from_pretrained` builds this model from."""
  refuse_resnet(cfg, 'Hugging Face config')
  v, t = cfg['vision'], cfg['text']
  act = cfg.get('activation', 'quick_gelu')
  if cfg.get('text_pool', 'argmax') == 'argmax':
    eos = 2
  else:
    eos = int(cfg['eot_token_id'])
    if eos == 2:
      raise ValueError('Hugging Face layout: text_pool="eot_id" with eot_token_id=2 cannot be '
                       'written: transformers reads eos_token_id=2 as "pool at the argmax"')
  common = dict(hidden_act=act, layer_norm_eps=1e-5, attention_dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0, projection_dim=cfg['embed_dim'])
  return dict(
      architectures=['CLIPModel'], model_type='clip', projection_dim=cfg['embed_dim'],
      logit_scale_init_value=float(ModelOptions.from_config(cfg).logit_scale_init),
      initializer_factor=1.0, torch_dtype=torch_dtype,
      text_config=dict(common, model_type='clip_text_model', vocab_size=t['vocab_size'],
                       hidden_size=t['width'], intermediate_size=4 * t['width'],
                       num_hidden_layers=t['layers'], num_attention_heads=t['heads'],
                       max_position_embeddings=t['context_length'], eos_token_id=eos),
      vision_config=dict(common, model_type='clip_vision_model', hidden_size=v['width'],
                         intermediate_size=4 * v['width'], num_hidden_layers=v['layers'],
                         num_attention_heads=v['heads'], image_size=v['image_size'],
                         patch_size=v['patch_size'], num_channels=3))
