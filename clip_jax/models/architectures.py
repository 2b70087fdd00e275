"""OpenAI's nine CLIP architectures as declarative data, plus `tiny`.

One source of truth: `configs/*.py`, `clip_jax.load(name)` and the converter's
shape inference all read these entries. Each entry is a plain dict so that it
can be printed, diffed and turned into an `ml_collections.ConfigDict`. The defaults
of the model options (`ModelOptions`), the keys that fix the parameter shapes
(`ARCHITECTURE_KEYS`) and CLIP's pixel statistics live here too; OpenAI's numbers
(vocabulary, special tokens, temperature) in `openai_constants`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import ml_collections

from clip_jax.models import openai_constants as openai

# Text tower shared by all OpenAI models except for width/heads.
_OPENAI_TEXT = dict(context_length=openai.CONTEXT_LENGTH, vocab_size=openai.VOCAB_SIZE, layers=12)


def _vit(embed_dim, image_size, patch_size, width, layers, text_width, text_heads):
  return dict(
      embed_dim=embed_dim,
      vision=dict(type='vit', image_size=image_size, patch_size=patch_size,
                  width=width, layers=layers, heads=width // 64),
      text=dict(_OPENAI_TEXT, width=text_width, heads=text_heads),
  )


def _resnet(embed_dim, image_size, layers, width, text_width, text_heads):
  return dict(
      embed_dim=embed_dim,
      # Attention-pool heads: OpenAI uses width * 32 // 64.
      vision=dict(type='resnet', image_size=image_size, layers=tuple(layers),
                  width=width, heads=width * 32 // 64),
      text=dict(_OPENAI_TEXT, width=text_width, heads=text_heads),
  )


ARCHITECTURES: dict[str, dict[str, Any]] = {
    'RN50': _resnet(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    'RN101': _resnet(512, 224, (3, 4, 23, 3), 64, 512, 8),
    'RN50x4': _resnet(640, 288, (4, 6, 10, 6), 80, 640, 10),
    'RN50x16': _resnet(768, 384, (6, 8, 18, 8), 96, 768, 12),
    'RN50x64': _resnet(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    'ViT-B/32': _vit(512, 224, 32, 768, 12, 512, 8),
    'ViT-B/16': _vit(512, 224, 16, 768, 12, 512, 8),
    'ViT-L/14': _vit(768, 224, 14, 1024, 24, 768, 12),
    'ViT-L/14@336': _vit(768, 336, 14, 1024, 24, 768, 12),
    # Small enough to train on a laptop CPU in minutes; same code paths as ViT-B.
    'tiny': dict(
        embed_dim=64,
        vision=dict(type='vit', image_size=32, patch_size=8, width=64, layers=2, heads=2),
        text=dict(context_length=16, vocab_size=512, width=64, heads=2, layers=2),
        # A SentencePiece vocabulary (trained on the captions): EOT (id 3) is not the largest id.
        text_pool='eot_id', eot_token_id=3,
    ),
}

OPENAI_NAMES = tuple(n for n in ARCHITECTURES if n != 'tiny')

# The pixel statistics every OpenAI model was trained with (RGB, on [0, 1] values): the
# training pipeline and the tensorflow-free evaluation loaders both normalise with these.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Fields of a model config that fix the parameter shapes: a checkpoint is refused by a
# config that differs in them, and `clip_jax.load` cannot override them.
ARCHITECTURE_KEYS = ('name', 'embed_dim', 'vision', 'text')

# Training options that sit in config.model.vision but leave the shapes unchanged, with
# their defaults: `model_config` adds them to the zoo's vision section, and comparisons
# of architectures (`architecture_vision`) leave them out.
#   mask_ratio: FLIP's share of patch tokens each example drops in training (ViT towers
#     only; the train step's default when no stage overrides it). Evaluation, export and
#     `clip_jax.load` always run every patch.
VISION_OPTIONS: dict[str, Any] = {'mask_ratio': 0.0}


def architecture_vision(vision: Mapping[str, Any]) -> dict[str, Any]:
  """A config.model.vision section without its training options (`VISION_OPTIONS`)."""
  return {k: v for k, v in dict(vision).items() if k not in VISION_OPTIONS}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Options every tower honours; they do not change the parameter shapes.

  The field defaults are the one statement of each option's default: `model_config`
  writes them into every config, and `build_model` fills a config that lacks one
  (an older config.json) from here.
  """
  activation: str = 'quick_gelu'      # 'quick_gelu' (OpenAI weights) or 'gelu'.
  dtype: str = 'float32'              # compute dtype; parameters stay float32.
  remat_policy: str = 'none'          # 'none' | 'full' | 'dots' | 'dots_no_batch' |
                                      # 'save_attn_out'.
  scan_layers: bool = False           # nn.scan over transformer blocks (faster compile).
  attention_impl: str | None = 'xla'  # 'xla' (einsum-softmax, layers.attention) | 'cudnn' | None.
  logit_scale_init: float = openai.LOGIT_SCALE_INIT
  logit_scale_max: float = openai.LOGIT_SCALE_MAX
  # Text features at the end-of-text token: 'argmax' (OpenAI: EOT has the
  # largest id) or 'eot_id' (first position of `eot_token_id`).
  text_pool: str = 'argmax'
  eot_token_id: int = openai.EOT_TOKEN_ID

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> ModelOptions:
    """The options a model config sets, the defaults for those it does not."""
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


MODEL_DEFAULTS: dict[str, Any] = dataclasses.asdict(ModelOptions())

# A name users may type for an architecture, and the file-friendly alias.
_ALIASES = {n.lower().replace('/', '').replace('-', '').replace('@', '_'): n for n in ARCHITECTURES}


def canonical_name(name: str) -> str:
  """'vit_b32', 'ViT-B-32', 'vit-b/32' -> 'ViT-B/32'; raises with the known names."""
  key = name.lower().replace('/', '').replace('-', '').replace('_', '').replace('@', '')
  for alias, canonical in _ALIASES.items():
    if alias.replace('_', '') == key:
      return canonical
  raise ValueError(
      f'config.model.name: unknown architecture {name!r}; expected one of '
      f'{", ".join(ARCHITECTURES)}')


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The full model ConfigDict of an architecture, with option overrides."""
  arch = copy.deepcopy(ARCHITECTURES[canonical_name(name)])
  cfg = dict(MODEL_DEFAULTS, name=canonical_name(name))
  cfg.update(arch)
  cfg['vision'] = dict(arch['vision'], **VISION_OPTIONS)
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f'config.model: unknown option(s) {sorted(unknown)}; '
                     f'expected some of {sorted(cfg)}')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)
