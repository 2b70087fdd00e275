"""Checkpoints on orbax: model-only exports and the trainer's preemption-safe state.

Layout of a workdir:

    workdir/config.json                 the full experiment config (ml_collections, JSON)
    workdir/checkpoints/<step>/model    variables {'params', maybe 'batch_stats'}
    workdir/checkpoints/<step>/opt_state   optimizer state (training checkpoints only)
    workdir/checkpoints/<step>/meta     JSON: step, kind, data iterator position, ...

A step directory appears only once fully written: orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames it (or, on object stores, writes a
commit marker), so a checkpoint cut short by a crash is never taken for the latest.

`save_model` / `load_model` are what the importer and `clip_jax.load` use;
`TrainCheckpointer` is what the trainer uses (async saves, keep-last-K and
every-M-th, restore onto any mesh by giving target shardings).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clip_jax import storage
from clip_jax.models.architectures import ARCHITECTURE_KEYS, architecture_vision

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
MODEL, OPT_STATE, META = 'model', 'opt_state', 'meta'


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in (MODEL, OPT_STATE):
    registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add(META, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  registry.add(META, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return registry


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, absolute (orbax refuses relative paths) or a URL as given."""
  return storage.join(workdir, CHECKPOINT_DIR)


# Spelled out in full so that orbax does not warn about what read_only implies.
def _read_only() -> ocp.CheckpointManagerOptions:
  return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


def _manager(workdir: str | os.PathLike, options: ocp.CheckpointManagerOptions | None = None
             ) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               handler_registry=_handler_registry())


# --- the experiment config stored beside the checkpoints ---------------------------------

def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The experiment config a workdir was written with (tuples come back as lists)."""
  path = storage.join(workdir, CONFIG_FILE)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no {CONFIG_FILE}; expected a workdir written by '
                            'clip_jax (python -m clip_jax.main or the converter)')
  try:
    return ml_collections.ConfigDict(json.loads(storage.read_text(path)))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> epath.Path:
  """Writes `config.json` (on process 0 only; the others share the filesystem)."""
  path = storage.join(workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    storage.write_text(path, config_to_json(config) + '\n')   # atomic: never half a config
  return path


def _architecture(model_config: Mapping[str, Any]) -> dict[str, Any]:
  # JSON round trip so that tuples and lists compare equal.
  as_dict = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  fields = {k: as_dict.get(k) for k in ARCHITECTURE_KEYS}
  if fields['vision'] is not None:   # its training options (mask_ratio) may change on resume
    fields['vision'] = architecture_vision(fields['vision'])
  return json.loads(json.dumps(fields, default=list))


def check_compatible(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose config.json describes a different architecture."""
  path = storage.join(workdir, CONFIG_FILE)
  if not path.exists():
    return
  stored, wanted = _architecture(read_config(workdir).model), _architecture(config.model)
  if stored != wanted:
    diffs = [k for k in ARCHITECTURE_KEYS if stored.get(k) != wanted.get(k)]
    raise ValueError(
        f'{path}: this workdir was written by architecture {stored.get("name")!r} and '
        f'config.model asks for {wanted.get("name")!r} (config.model.{", config.model.".join(diffs)} '
        'differ); use a new --workdir, or remove the old one to start over')


# --- model-only checkpoints ---------------------------------------------------------------

def save_model(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
               variables: Mapping[str, Any], step: int = 0) -> epath.Path:
  """Writes `variables` as a model-only checkpoint at `step` and `config.json`.

  `config` is the full experiment config (`clip_jax.config.get_config(...)`), so the
  workdir can be loaded with `load_model`, evaluated, or trained further.
  Returns the step directory.
  """
  check_compatible(workdir, config)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
  with _manager(workdir, options) as manager:
    if step in manager.all_steps():
      raise FileExistsError(f'{checkpoint_dir(workdir) / str(step)}: a checkpoint at step '
                            f'{step} exists already; choose another workdir or step')
    write_config(workdir, config)
    manager.save(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(dict(variables)),
        META: ocp.args.JsonSave({'step': int(step), 'kind': 'model'})}))
    manager.wait_until_finished()
  return checkpoint_dir(workdir) / str(step)


def abstract_like(metadata_tree: Any, sharding: Any) -> Any:
  """ShapeDtypeStructs for a stored tree; `sharding` is one sharding or a matching tree."""
  shardings = (sharding if isinstance(sharding, (dict, list, tuple)) else
               jax.tree.map(lambda _: sharding, metadata_tree))
  return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                      metadata_tree, shardings)


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The latest complete checkpoint step in a workdir, or None."""
  if not checkpoint_dir(workdir).exists():
    return None
  with _manager(workdir, _read_only()) as manager:
    return manager.latest_step()


def load_model(workdir: str | os.PathLike, step: int | None = None, sharding: Any = None
               ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(experiment config, variables) of the latest (or `step`) checkpoint in `workdir`.

  Works on model-only and training checkpoints alike (only the `model` item is
  read). Arrays land on `sharding` (one sharding, or a tree matching the
  variables); by default on the first local device.
  """
  config = read_config(workdir)
  if not checkpoint_dir(workdir).exists():
    raise FileNotFoundError(f'{checkpoint_dir(workdir)}: no checkpoints directory; expected '
                            'a workdir written by clip_jax')
  with _manager(workdir, _read_only()) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'{checkpoint_dir(workdir)}: holds no complete checkpoint')
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f'{checkpoint_dir(workdir)}: no checkpoint at step {step}; '
                              f'found steps {sorted(steps)}')
    stored = manager.item_metadata(step)[MODEL].tree
    target = abstract_like(stored, sharding or jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0]))
    restored = manager.restore(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardRestore(target)}))
  return config, dict(restored[MODEL])


# --- training checkpoints ---------------------------------------------------------------

class TrainCheckpointer:
  """The trainer's CheckpointManager: async, pruned, resumable onto any mesh.

  Items per step: `model` (variables), `opt_state`, `meta` (JSON: step, data
  iterator position, anything else the trainer records). `every_steps` sets the
  regular saves; `keep` the last ones kept; `keep_every` (0: none) the steps kept
  for good. Whether a step is due is orbax's decision (`should_save`); the trainer
  forces only the saves no interval predicts (the last step, a preemption).
  """

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int = 3,
               keep_every: int = 0, async_save: bool = True):
    policies = [ocp.checkpoint_managers.LatestN(max(1, int(keep)))]
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(int(keep_every)))
    # Every `every_steps`-th step, and the step a multi-host preemption notice reached.
    # A policy rather than `save_interval_steps`, which would add orbax's
    # InitialSavePolicy: a checkpoint at the first step of every fresh run.
    saves = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(max(1, int(every_steps))),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=saves,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # Leftovers of a save cut short (kill -9 during an async write) are removed.
        cleanup_tmp_directories=True,
        create=True)
    self.directory = checkpoint_dir(workdir)
    self._manager = _manager(workdir, options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """A save is due at `step` by the policy above (and `step` is past the latest)."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True on every host once a multi-host preemption notice reached `step`."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, variables: Mapping[str, Any], opt_state: Any,
           meta: Mapping[str, Any], force: bool = False) -> bool:
    """Starts an (async) save if `step` is due or `force`; returns whether it did.

    `force` is for the saves that must happen off the interval: the last step and a
    single-process SIGTERM (which orbax's preemption policy does not see).
    """
    if step in self._manager.all_steps():
      return False
    meta = dict(meta, step=int(step), kind='train')
    return self._manager.save(step, force=force, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(dict(variables)),
        OPT_STATE: ocp.args.StandardSave(opt_state),
        META: ocp.args.JsonSave(_jsonable(meta))}))

  def restore(self, step: int, abstract_variables: Any, abstract_opt_state: Any
              ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(variables, opt_state, meta) at `step`, placed as the abstract targets say.

    The targets are ShapeDtypeStructs carrying the shardings of the current mesh,
    so a checkpoint written on one mesh or device count restores onto another.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardRestore(abstract_variables),
        OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
        META: ocp.args.JsonRestore()}))
    return dict(restored[MODEL]), restored[OPT_STATE], dict(restored[META])

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'TrainCheckpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _jsonable(tree: Any) -> Any:
  """numpy scalars and arrays in data iterator states become plain JSON values."""
  return json.loads(json.dumps(tree, default=lambda x: np.asarray(x).tolist()))
