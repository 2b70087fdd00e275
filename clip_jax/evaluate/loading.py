"""A model, its variables on the mesh and its tokenizer, for the evaluate and embed CLIs."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from clip_jax import storage
from clip_jax.models import build_model
from clip_jax.models.clip import CLIP
from clip_jax.sharding import replicated

OPENAI_VOCAB_SIZE = 49408


@dataclasses.dataclass
class LoadedModel:
  model_config: ml_collections.ConfigDict
  module: CLIP
  variables: Any                                      # replicated on the mesh
  tokenizer_spec: str = ''                            # --tokenizer
  experiment: ml_collections.ConfigDict | None = None  # the run's full config, if any

  @functools.cached_property
  def tokenizer(self) -> Callable[[Sequence[str]], np.ndarray]:
    """Built on first use: embedding images needs none, so a missing one is no error."""
    tokenizer = make_tokenizer(self.tokenizer_spec, self.model_config, self.experiment)
    if tokenizer is None:
      raise ValueError('--tokenizer: this model has no known tokenizer; pass clip_bpe or a '
                       'SentencePiece .model file')
    return tokenizer


def make_tokenizer(spec: str, model_config: ml_collections.ConfigDict,
                   experiment: ml_collections.ConfigDict | None = None
                   ) -> Callable[[Sequence[str]], np.ndarray] | None:
  """`--tokenizer`: 'clip_bpe', a SentencePiece `.model` file, or '' (the workdir's
  config.data.tokenizer, else CLIP BPE for a model with OpenAI's 49,408-token vocabulary,
  else None: the model cannot encode text without being told its tokenizer)."""
  from clip_jax.data.tokenizers import (ClipBpeTokenizer, SentencePieceTokenizer,
                                        get_tokenizer)
  context = int(model_config.text.context_length)
  if spec == 'clip_bpe':
    return ClipBpeTokenizer(context_length=context)
  if spec:
    if not storage.is_file(spec):
      raise FileNotFoundError(f'--tokenizer: {spec!r} is neither clip_bpe nor an existing '
                              'SentencePiece .model file')
    return SentencePieceTokenizer(spec, context)
  section = experiment.data.get('tokenizer') if experiment and 'data' in experiment else None
  # A run whose SentencePiece model was never set has no tokenizer to offer.
  if section and not (section.get('type') == 'sentencepiece' and not section.get('model_path')):
    return get_tokenizer(section)
  if int(model_config.text.vocab_size) == OPENAI_VOCAB_SIZE:
    return ClipBpeTokenizer(context_length=context)
  return None


def load_for_evaluation(mesh: Mesh, *, workdir: str = '', source: str = '',
                        tokenizer: str = '') -> LoadedModel:
  """From a clip_jax workdir (checkpoint + config.json) or anything `clip_jax.load` reads."""
  if bool(workdir) == bool(source):
    raise ValueError('give exactly one of --workdir (a clip_jax run) or --source (a path or '
                     'architecture name for clip_jax.load)')
  experiment = None
  if workdir:
    from clip_jax.checkpoint import load_model   # orbax is only needed for workdirs
    experiment, variables = load_model(workdir)
    model_config = experiment.model
  else:
    import clip_jax
    loaded = clip_jax.load(source)
    model_config, variables = loaded.config, loaded.variables
    from clip_jax.checkpoint import CONFIG_FILE, read_config
    if storage.is_url(source) or storage.is_dir(source):
      if storage.is_file(storage.join(source, CONFIG_FILE)):
        experiment = read_config(source)
  variables = jax.device_put(variables, replicated(mesh))
  return LoadedModel(model_config, build_model(model_config), variables, tokenizer, experiment)
