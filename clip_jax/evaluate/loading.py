"""The model handle of the evaluate and embed CLIs: `clip_jax.ClipModel`, replicated on a mesh."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from clip_jax.api import ClipModel, load, load_workdir
from clip_jax.sharding import replicated


def load_for_evaluation(mesh: Mesh, *, workdir: str = '', weights: str = '',
                        tokenizer: str = '', **model_overrides: Any) -> ClipModel:
  """From a clip_jax workdir (checkpoint + config.json) or `weights`: anything
  `clip_jax.load` reads (the CLIs' --source flag).

  `tokenizer` is the --tokenizer flag (see `clip_jax.data.tokenizers.tokenizer_for`);
  `model_overrides` are options that keep the weights' shapes (e.g. `dtype='bfloat16'`:
  features computed in bfloat16 on the whole mesh, parameters kept in float32).
  """
  if bool(workdir) == bool(weights):
    raise ValueError('give exactly one of --workdir (a clip_jax run) or --source (a path or '
                     'architecture name for clip_jax.load)')
  model = (load_workdir(workdir, tokenizer=tokenizer, **model_overrides) if workdir
           else load(weights, tokenizer=tokenizer, **model_overrides))
  # Every device holds the whole model; the handle's module and jitted encoders stay. The
  # copy goes through host memory: on several hosts, each places its own devices' replicas
  # (a device-to-device put across hosts is not supported everywhere, e.g. on CPU).
  model.variables = jax.device_put(jax.device_get(model.variables), replicated(mesh))
  return model
