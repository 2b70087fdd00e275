"""Input pipeline: sources, preprocessing, tokenizers, delivery to the mesh.

Importing this package does not import tensorflow (accelerator hosts may lack it):
the tokenizers and the delivery functions are plain Python/numpy/jax, and the
tf.data pipeline (`clip_jax.data.pipeline`) is loaded on first use of its names.
"""

from __future__ import annotations

import importlib
from typing import Any

from clip_jax.data.delivery import MeshPrefetcher, all_host_states, prefetch_to_mesh, to_global
from clip_jax.data.tokenizers import (ClipBpeTokenizer, SentencePieceTokenizer, get_tokenizer,
                                      train_sentencepiece)

# Names served lazily from modules that import tensorflow.
_LAZY = {
    'make_train_iterator': 'clip_jax.data.pipeline',
    'make_eval_iterator': 'clip_jax.data.pipeline',
    'TrainIterator': 'clip_jax.data.pipeline',
    'EvalIterator': 'clip_jax.data.pipeline',
    'write_tfrecord_shards': 'clip_jax.data.shards',
}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['ClipBpeTokenizer', 'MeshPrefetcher', 'all_host_states', 'SentencePieceTokenizer', 'get_tokenizer',
           'prefetch_to_mesh', 'to_global', 'train_sentencepiece', *_LAZY]
