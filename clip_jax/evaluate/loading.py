"""The model handle of the evaluate and embed CLIs: `clip_jax.ClipModel`, replicated on a mesh."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from clip_jax.api import ClipModel, load, load_workdir
from clip_jax.sharding import replicated


def load_for_evaluation(mesh: Mesh, *, workdir: str = '', weights: str = '',
                        tokenizer: str = '') -> ClipModel:
  """From a clip_jax workdir (checkpoint + config.json) or `weights`: anything
  `clip_jax.load` reads (the CLIs' --source flag).

  `tokenizer` is the --tokenizer flag (see `clip_jax.data.tokenizers.tokenizer_for`).
  """
  if bool(workdir) == bool(weights):
    raise ValueError('give exactly one of --workdir (a clip_jax run) or --source (a path or '
                     'architecture name for clip_jax.load)')
  model = (load_workdir(workdir, tokenizer=tokenizer) if workdir
           else load(weights, tokenizer=tokenizer))
  # Every device holds the whole model; the handle's module and jitted encoders stay.
  model.variables = jax.device_put(model.variables, replicated(mesh))
  return model
