"""Flax CLIP models: layers, towers, the two-tower model, and the architecture table."""

from clip_jax.models.architectures import ARCHITECTURES, OPENAI_NAMES, canonical_name, model_config
from clip_jax.models.clip import (CLIP, build_model, count_params, init_variables, l2_normalize,
                                  param_shapes, validate_model_config)

__all__ = ['ARCHITECTURES', 'OPENAI_NAMES', 'CLIP', 'build_model', 'canonical_name',
           'count_params', 'init_variables', 'l2_normalize', 'model_config', 'param_shapes',
           'validate_model_config']
