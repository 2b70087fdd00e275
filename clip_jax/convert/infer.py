"""The model config of a PyTorch CLIP, read from its tensor shapes (or HF config.json).

OpenAI's `build_model` does the same from a state dict: ViT if `visual.proj` exists,
else ModifiedResNet; widths, depths, patch and image size, context and vocabulary
from the shapes; heads are width // 64 (attention-pool heads 32 * width // 64), the
rule every OpenAI and open_clip CLIP follows. A config whose shapes equal a zoo entry
(`clip_jax.models.architectures.ARCHITECTURES`) takes that entry's name; otherwise the
result is a custom config with the same keys, named after the closest zoo entry with
the same image tower (its `vision` / `text` sections hold the real sizes, which are
what `build_model` reads).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from clip_jax.models import openai_constants as openai
from clip_jax.models.architectures import (ARCHITECTURES, MODEL_DEFAULTS, ModelOptions,
                                           architecture_vision, model_config)

HEAD_WIDTH = 64


def _count(state: Mapping[str, Any], pattern: str) -> int:
  """How many distinct indices fill `{}` in keys matching pattern (e.g. 'visual.layer1.{}.')."""
  regex = re.compile('^' + re.escape(pattern).replace(r'\{\}', r'(\d+)'))
  return len({m.group(1) for k in state if (m := regex.match(k))})


def _need(state: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
  if key not in state:
    raise ValueError(f'{source}: missing key {key!r}; not an OpenAI/open_clip CLIP state dict '
                     '(a model with the text tower under "text." or a SigLIP/CoCa model is '
                     'not supported)')
  return tuple(np.shape(state[key]))


def _architecture_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  vision = architecture_vision(cfg['vision'])
  if 'layers' in vision and not isinstance(vision['layers'], int):
    vision['layers'] = tuple(vision['layers'])
  return {'embed_dim': cfg['embed_dim'], 'vision': vision, 'text': dict(cfg['text'])}


def build_config(arch: Mapping[str, Any], **options: Any) -> ml_collections.ConfigDict:
  """A full model config for architecture fields (embed_dim, vision, text) and options.

  Takes the zoo entry's name when the fields equal one, else the closest entry of the
  same tower type, with the given sizes.
  """
  fields = _architecture_fields(arch)
  for name, entry in ARCHITECTURES.items():
    if _architecture_fields(entry) == fields:
      return model_config(name, **options)

  def distance(name: str) -> int:
    entry = _architecture_fields(ARCHITECTURES[name])
    return sum(entry['vision'].get(k) != v for k, v in fields['vision'].items()) + \
        sum(entry['text'].get(k) != v for k, v in fields['text'].items()) + \
        (entry['embed_dim'] != fields['embed_dim'])

  same_type = [n for n, e in ARCHITECTURES.items() if e['vision']['type'] == fields['vision']['type']]
  # Only the name is borrowed: options a zoo entry sets (tiny's text pooling) do not carry over.
  cfg = model_config(min(same_type, key=distance), **dict(MODEL_DEFAULTS, **options))
  cfg.embed_dim = fields['embed_dim']
  cfg.vision = ml_collections.ConfigDict(fields['vision'])
  cfg.text = ml_collections.ConfigDict(fields['text'])
  return cfg


def is_zoo_architecture(cfg: Mapping[str, Any]) -> bool:
  """True when the config's shapes are exactly those of its named zoo entry."""
  entry = ARCHITECTURES.get(cfg['name'])
  return entry is not None and _architecture_fields(entry) == _architecture_fields(cfg)


def openai_architecture(state: Mapping[str, Any], source: str) -> dict[str, Any]:
  """embed_dim / vision / text fields from an OpenAI-layout state dict's shapes."""
  text_width = _need(state, 'ln_final.weight', source)[0]
  text = dict(
      context_length=_need(state, 'positional_embedding', source)[0],
      vocab_size=_need(state, 'token_embedding.weight', source)[0],
      width=text_width, heads=max(1, text_width // HEAD_WIDTH),
      layers=_count(state, 'transformer.resblocks.{}.'))
  embed_dim = _need(state, 'text_projection', source)[1]
  if 'visual.proj' in state:
    width, _, patch, _ = _need(state, 'visual.conv1.weight', source)
    grid = round((_need(state, 'visual.positional_embedding', source)[0] - 1) ** 0.5)
    vision = dict(type='vit', image_size=patch * grid, patch_size=patch, width=width,
                  layers=_count(state, 'visual.transformer.resblocks.{}.'),
                  heads=max(1, width // HEAD_WIDTH))
  else:
    width = _need(state, 'visual.layer1.0.conv1.weight', source)[0]
    grid = round((_need(state, 'visual.attnpool.positional_embedding', source)[0] - 1) ** 0.5)
    vision = dict(type='resnet', image_size=grid * 32,
                  layers=tuple(_count(state, f'visual.layer{s}.{{}}.') for s in range(1, 5)),
                  width=width, heads=width * 32 // HEAD_WIDTH)
  return dict(embed_dim=embed_dim, vision=vision, text=text)


def hf_architecture(hf_config: Mapping[str, Any], source: str) -> tuple[dict[str, Any],
                                                                          dict[str, Any]]:
  """(architecture fields, model options) from a Hugging Face CLIPModel config.json."""
  try:
    vision, text = hf_config['vision_config'], hf_config['text_config']
  except KeyError as e:
    raise ValueError(f'{source}: missing {e.args[0]!r}; expected a CLIPModel config.json') from None
  get = lambda section, key, default: section.get(key, default)
  acts = {get(vision, 'hidden_act', 'quick_gelu'), get(text, 'hidden_act', 'quick_gelu')}
  if len(acts) > 1 or not acts <= {'quick_gelu', 'gelu'}:
    raise ValueError(f'{source}: hidden_act {sorted(acts)} is not supported; expected '
                     "'quick_gelu' or 'gelu', the same in both towers")
  for name, section, default_width in (('vision_config', vision, 768), ('text_config', text, 512)):
    width = get(section, 'hidden_size', default_width)
    if get(section, 'intermediate_size', 4 * width) != 4 * width:
      raise ValueError(f'{source}: {name}.intermediate_size {section["intermediate_size"]} is '
                       f'not 4 x hidden_size {width}, the only MLP ratio clip_jax builds')
    if abs(float(get(section, 'layer_norm_eps', 1e-5)) - 1e-5) > 1e-12:
      raise ValueError(f'{source}: {name}.layer_norm_eps {section["layer_norm_eps"]} is not '
                       '1e-5, the epsilon clip_jax uses')
  image_size, patch = get(vision, 'image_size', 224), get(vision, 'patch_size', 32)
  arch = dict(
      embed_dim=hf_config.get('projection_dim', 512),
      vision=dict(type='vit', image_size=image_size, patch_size=patch,
                  width=get(vision, 'hidden_size', 768),
                  layers=get(vision, 'num_hidden_layers', 12),
                  heads=get(vision, 'num_attention_heads', 12)),
      text=dict(context_length=get(text, 'max_position_embeddings', openai.CONTEXT_LENGTH),
                vocab_size=get(text, 'vocab_size', openai.VOCAB_SIZE),
                width=get(text, 'hidden_size', 512),
                heads=get(text, 'num_attention_heads', 8),
                layers=get(text, 'num_hidden_layers', 12)))
  # HF pools text at the argmax of the ids when eos_token_id == 2 (its configs before
  # transformers 4.31), else at the first eos_token_id.
  eos = get(text, 'eos_token_id', 2)
  options: dict[str, Any] = dict(activation=acts.pop())
  if eos == 2 or eos == arch['text']['vocab_size'] - 1:
    options.update(text_pool='argmax', eot_token_id=arch['text']['vocab_size'] - 1)
  else:
    options.update(text_pool='eot_id', eot_token_id=int(eos))
  if 'logit_scale_init_value' in hf_config:
    options['logit_scale_init'] = float(hf_config['logit_scale_init_value'])
  return arch, options


def open_clip_model_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """open_clip's `model_cfg` (as in open_clip_config.json) for a clip_jax model config."""
  v, t = cfg['vision'], cfg['text']
  if v['type'] == 'vit':
    vision_cfg = dict(image_size=v['image_size'], layers=v['layers'], width=v['width'],
                      patch_size=v['patch_size'], head_width=v['width'] // v['heads'])
  else:
    vision_cfg = dict(image_size=v['image_size'], layers=list(v['layers']), width=v['width'],
                      patch_size=None, head_width=v['width'] * 32 // v['heads'])
  text_cfg = dict(context_length=t['context_length'], vocab_size=t['vocab_size'],
                  width=t['width'], heads=t['heads'], layers=t['layers'])
  options = ModelOptions.from_config(cfg)
  if options.text_pool == 'eot_id':
    text_cfg.update(pool_type='eos', eos_id=int(options.eot_token_id))
  return dict(embed_dim=cfg['embed_dim'], quick_gelu=options.activation == 'quick_gelu',
              vision_cfg=vision_cfg, text_cfg=text_cfg)


def open_clip_name(cfg: Mapping[str, Any]) -> str | None:
  """open_clip's built-in model name for a zoo architecture ('ViT-B-32-quickgelu'), else None."""
  options = ModelOptions.from_config(cfg)
  if not is_zoo_architecture(cfg) or cfg['name'] == 'tiny' or options.text_pool != 'argmax':
    return None
  name = cfg['name'].replace('/', '-').replace('@', '-')
  return name + ('-quickgelu' if options.activation == 'quick_gelu' else '')
