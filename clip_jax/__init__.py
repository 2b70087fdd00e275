"""clip_jax: CLIP (Radford et al., 2021) in JAX/Flax, from a laptop CPU to a TPU pod."""

import os

# TensorFlow's C++ start-up lines (oneDNN, CPU features) stay off the console of every
# command; TF_CPP_MIN_LOG_LEVEL=0 brings them back.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# First: the path layer picks etils.epath's backend before anything else can (see storage).
from clip_jax import storage  # noqa: F401  pylint: disable=unused-import
from clip_jax.api import ClipModel, load
from clip_jax.models import ARCHITECTURES

__version__ = '0.1.0'
__all__ = ['ARCHITECTURES', 'ClipModel', 'load', '__version__']
