"""The two-tower CLIP model, built from a model ConfigDict."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clip_jax.models.architectures import VISION_OPTIONS, ModelOptions
from clip_jax.models.layers import ACTIVATIONS, REMAT_POLICIES, Dtype, logical
from clip_jax.models.resnet import ModifiedResNet, refuse_masking
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer, valid_mask_ratio

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
  """Image and text towers with a learnable temperature.

  `encode_image` / `encode_text` return unnormalised features (as OpenAI's);
  `__call__` returns L2-normalised features and the log temperature, which is
  what every loss in `clip_jax.losses` takes.
  """
  visual: nn.Module
  text: nn.Module
  logit_scale_init: float

  def setup(self):
    self.logit_scale = self.param('logit_scale',
                                  logical(nn.initializers.constant(self.logit_scale_init), ()),
                                  ())

  def encode_image(self, images: jax.Array, train: bool = False, mask_ratio: float = 0.0
                   ) -> jax.Array:
    """mask_ratio > 0 (a static float; ViT towers only) drops that share of each example's
    patch tokens at random (FLIP) and needs `rngs={'mask': key}` in `apply`."""
    return self.visual(images, train=train, mask_ratio=mask_ratio)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    return self.text(tokens)

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False,
               mask_ratio: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    image_features = l2_normalize(self.encode_image(images, train=train, mask_ratio=mask_ratio))
    text_features = l2_normalize(self.encode_text(tokens))
    return image_features, text_features, self.logit_scale


def _fail(field: str, message: str) -> None:
  raise ValueError(f'config.model.{field}: {message}')


def validate_model_config(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> None:
  """Checks a model config; raises ValueError naming the offending field."""
  for key in ('embed_dim', 'vision', 'text'):
    if key not in cfg:
      _fail(key, 'missing')
  vision, text = cfg['vision'], cfg['text']
  vtype = vision.get('type')
  if vtype not in ('vit', 'resnet'):
    _fail('vision.type', f"unknown architecture {vtype!r}; expected 'vit' or 'resnet'")
  for key in ('image_size', 'width', 'layers', 'heads'):
    if key not in vision:
      _fail(f'vision.{key}', 'missing')
  if vtype == 'vit':
    if 'patch_size' not in vision:
      _fail('vision.patch_size', 'missing')
    if vision['image_size'] % vision['patch_size']:
      _fail('vision.patch_size', f"{vision['patch_size']} does not divide "
            f"vision.image_size {vision['image_size']}")
    if vision['width'] % vision['heads']:
      _fail('vision.heads', f"{vision['heads']} does not divide vision.width {vision['width']}")
  else:
    if len(vision['layers']) != 4:
      _fail('vision.layers', f"expected 4 stage depths, got {tuple(vision['layers'])}")
    if vision['image_size'] % 32:
      _fail('vision.image_size', f"{vision['image_size']} is not a multiple of 32 "
            '(the ModifiedResNet downsamples 32x)')
    if (vision['width'] * 32) % vision['heads']:
      _fail('vision.heads', f"{vision['heads']} does not divide the attention-pool width "
            f"{vision['width'] * 32}")
  mask_ratio = vision.get('mask_ratio', VISION_OPTIONS['mask_ratio'])
  if not valid_mask_ratio(mask_ratio):
    _fail('vision.mask_ratio', f'expected a fraction in [0, 1), got {mask_ratio!r}')
  if vtype == 'resnet':
    refuse_masking(mask_ratio)
  for key in ('context_length', 'vocab_size', 'width', 'layers', 'heads'):
    if key not in text:
      _fail(f'text.{key}', 'missing')
  if text['width'] % text['heads']:
    _fail('text.heads', f"{text['heads']} does not divide text.width {text['width']}")
  options = ModelOptions.from_config(cfg)
  if options.activation not in ACTIVATIONS:
    _fail('activation', f"unknown {options.activation!r}; expected one of {list(ACTIVATIONS)}")
  if options.dtype not in DTYPES:
    _fail('dtype', f"unknown {options.dtype!r}; expected one of {list(DTYPES)}")
  if options.remat_policy not in REMAT_POLICIES:
    _fail('remat_policy', f"unknown {options.remat_policy!r}; expected one of "
          f'{list(REMAT_POLICIES)}')
  if options.text_pool not in ('argmax', 'eot_id'):
    _fail('text_pool', f"unknown {options.text_pool!r}; expected 'argmax' or 'eot_id'")


@dataclasses.dataclass(frozen=True)
class TowerEncoder:
  """`encode_fn` for one tower of a CLIP module; hashable so compiled code is reused."""
  model: CLIP
  tower: str    # 'image' or 'text'

  def __call__(self, variables: Any, inputs: jax.Array) -> jax.Array:
    if self.tower == 'image':
      return self.model.apply(variables, inputs, method=CLIP.encode_image)
    if self.tower == 'text':
      return self.model.apply(variables, inputs, method=CLIP.encode_text)
    raise ValueError(f"TowerEncoder.tower: expected 'image' or 'text', got {self.tower!r}")


def build_model(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> CLIP:
  """A CLIP module from a model config (see `clip_jax.models.architectures`)."""
  validate_model_config(cfg)
  options = ModelOptions.from_config(cfg)
  dtype: Dtype = DTYPES[options.dtype]
  common = dict(dtype=dtype, remat_policy=options.remat_policy,
                attention_impl=options.attention_impl)
  v, t = cfg['vision'], cfg['text']
  if v['type'] == 'vit':
    vision = VisionTransformer(
        image_size=v['image_size'], patch_size=v['patch_size'], width=v['width'],
        layers=v['layers'], heads=v['heads'], output_dim=cfg['embed_dim'],
        activation=options.activation, scan_layers=options.scan_layers, **common)
  else:
    vision = ModifiedResNet(
        image_size=v['image_size'], layers=tuple(v['layers']), width=v['width'],
        heads=v['heads'], output_dim=cfg['embed_dim'], **common)
  text = TextTransformer(
      context_length=t['context_length'], vocab_size=t['vocab_size'], width=t['width'],
      layers=t['layers'], heads=t['heads'], output_dim=cfg['embed_dim'],
      activation=options.activation, scan_layers=options.scan_layers,
      text_pool=options.text_pool, eot_token_id=options.eot_token_id, **common)
  return CLIP(visual=vision, text=text, logit_scale_init=options.logit_scale_init)


def dummy_inputs(cfg: ml_collections.ConfigDict | Mapping[str, Any], batch: int = 1
                 ) -> tuple[jax.Array, jax.Array]:
  size = cfg['vision']['image_size']
  return (jnp.zeros((batch, size, size, 3), jnp.float32),
          jnp.zeros((batch, cfg['text']['context_length']), jnp.int32))


def init_variables(model: CLIP, cfg: ml_collections.ConfigDict | Mapping[str, Any],
                   rng: jax.Array) -> dict[str, Any]:
  """Variables ({'params', maybe 'batch_stats'}) with logical-partitioning boxes removed."""
  images, tokens = dummy_inputs(cfg)
  # Jitted: one compile instead of one per operation (tiny: 16 s -> 8 s on a CPU).
  variables = jax.jit(model.init)(rng, images, tokens)
  return nn.meta.unbox(variables)


def param_shapes(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """Abstract variables (ShapeDtypeStruct leaves) without allocating anything."""
  model = build_model(cfg)
  return jax.eval_shape(lambda rng: init_variables(model, cfg, rng), jax.random.key(0))


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
