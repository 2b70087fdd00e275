"""The trainer, readable top to bottom: setup, restore, loop, evaluate, save.

    train_and_evaluate(config, workdir)

1. Setup: validate the config; decide the data (the built-in scenes, or the user's:
   a given `config.data.train.pattern` turns the built-in data and its evaluation
   off, and a SentencePiece tokenizer is trained on the user's captions when the model
   needs one and none is given); check everything a run could otherwise fail on
   later (clip_jax.preflight: mesh, batch sizes, intervals, workdir, data, tokenizer,
   eval sets); refuse a workdir of another architecture; write `config.json`.
   `dry_run` stops here.
2. Restore: the latest checkpoint under `workdir/checkpoints` if there is one
   (parameters, optimizer state and the data position, onto the current mesh,
   whatever mesh wrote it); otherwise a fresh, directly sharded state.
3. Loop: prefetched global batches -> the jitted sharded step, one per stage of
   `config.train.stages` (patch mask ratio, image size, text length), each compiled
   once; at a stage's first step the input stream is rebuilt at the stage's image size
   and text length from the position it reached (no sample repeated or skipped), and a
   resume in the middle of a stage builds it at that stage's settings. Every
   `config.log.every_steps` a console line, `metrics.jsonl` and TensorBoard;
   every `config.eval.every_steps` an evaluation; checkpoints every
   `config.checkpoint.every_steps`, at the end, and on SIGTERM (then it returns).
   A NaN/Inf loss or gradient norm stops the run, naming the step and the metric; the
   last checkpoint stays the last good one (the metrics of the update a checkpoint
   holds are checked before it is saved).
4. Evaluate: `config.eval` through clip_jax.evaluate (unmasked, at the model's image
   size and context length, whatever the stage); the last printed line is the
   zero-shot top-1 (next to chance for the built-in held-out scenes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from clip_jax import checkpoint, flops, preflight, sharding, storage
from clip_jax import config as config_lib
from clip_jax.data import delivery, tokenizers
from clip_jax.metrics_writer import (DATA_SKIPPED, EVAL_PREFIX, IMAGES_PER_SECOND, METRICS_FILE,
                                     MFU, TENSORBOARD_DIR, MetricsWriter, console_line,
                                     format_duration)
from clip_jax.models.clip import build_model
from clip_jax.optim import make_optimizer
from clip_jax.train_step import (TrainState, create_train_state, describe_train_state,
                                 make_train_step, train_state_shardings)

PLACEMENT_HEADER = 'placement (mesh axes per dimension):'   # train_step.describe_train_state
TOKENIZER_DIR = 'tokenizer'        # <workdir>/tokenizer: one trained on the user's captions
TOKENIZER_CAPTIONS = 200_000       # captions it is trained on (the first ones of the data)
EVAL_TASKS = ('zeroshot', 'retrieval', 'linear_probe')


@dataclasses.dataclass
class TrainResult:
  """What a run ended with: the step reached, why it stopped, the evaluation."""
  step: int
  preempted: bool
  eval_results: dict[str, float]
  summary: str                     # the zero-shot line ('' without zero-shot evaluation)


# --- 1. setup ----------------------------------------------------------------------------

def validate_trainer_config(config: ml_collections.ConfigDict) -> None:
  """The trainer's own keys; errors name `config.<key>` and what was expected."""
  positive = {'total_steps': config.total_steps,
              'checkpoint.every_steps': config.checkpoint.every_steps,
              'checkpoint.keep': config.checkpoint.keep,
              'log.every_steps': config.log.every_steps}
  for key, value in positive.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{key}: expected a positive integer, got {value!r}')
  for key in ('checkpoint.keep_every', 'eval.every_steps'):
    value = config[key.split('.')[0]][key.split('.')[1]]
    if not isinstance(value, int) or value < 0:
      raise ValueError(f'config.{key}: expected an integer >= 0 (0 = off), got {value!r}')
  profile = tuple(config.log.profile_steps)
  if profile and (len(profile) != 2 or not 0 < profile[0] <= profile[1]):
    raise ValueError(f'config.log.profile_steps: expected () or (first, last) with '
                     f'0 < first <= last, got {profile}')


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def use_builtin_data(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Writes the built-in scenes (once) and points config.data at their shards and tokenizer."""
  from clip_jax.data import builtin  # pylint: disable=import-outside-toplevel
  section = config.builtin
  output_dir = (storage.resolve(section.dir) if section.dir
                else storage.join(workdir, 'builtin_data'))
  settings = dict(num_train=section.num_train, seed=section.seed,
                  image_size=config.model.vision.image_size, num_shards=section.num_shards,
                  vocab_size=config.model.text.vocab_size,
                  captions_per_image=section.captions_per_image)
  start = time.time()
  if jax.process_index() == 0:
    builtin.prepare(output_dir, **settings)
  _sync_processes('builtin_data')
  manifest = builtin.prepare(output_dir, **settings)   # reads what process 0 wrote
  logging.info('built-in data: %d scenes under %s (%.1fs)', manifest['num_train'], output_dir,
               time.time() - start)
  config.data.train.source = 'tfrecord'
  config.data.train.pattern = manifest['pattern']
  config.data.tokenizer.type = 'sentencepiece'
  config.data.tokenizer.model_path = manifest['tokenizer']


def choose_data(config: ml_collections.ConfigDict, explicit: frozenset[str] = frozenset()
                ) -> list[str]:
  """Built-in scenes or the user's data; the user's explicit flags win. Returns notes.

  A training pattern or TFDS name (from a flag or the config file) means the user's
  data: the built-in scenes are turned off (an explicit `builtin.enabled=True` with it is
  a conflict), and so is the built-in evaluation, unless its key was given explicitly.
  """
  train = config.data.train
  user_data = bool(train.pattern or train.tfds_name)
  if not config.builtin.enabled:
    return []
  if not user_data:
    if 'data.train.source' in explicit:
      raise ValueError(f'config.data.train.source={train.source!r} given without '
                       'config.data.train.pattern (or tfds_name): name the files to train on')
    return []
  if 'builtin.enabled' in explicit:
    raise ValueError('config.builtin.enabled=True and config.data.train.pattern/tfds_name are '
                     'both given: the built-in scenes would replace your data; drop one')
  config.builtin.enabled = False
  notes = ['data: config.data.train names your data, so the built-in scenes are off']
  from clip_jax.evaluate.datasets import BUILTIN_SETS  # pylint: disable=import-outside-toplevel
  from clip_jax.evaluate.run import dataset_specs  # pylint: disable=import-outside-toplevel
  for task in EVAL_TASKS:
    if f'eval.{task}' in explicit:
      continue
    specs = dataset_specs(config.eval[task])
    kept = [s for s in specs if s not in BUILTIN_SETS]
    if kept != specs:
      config.eval[task] = ','.join(kept)
      notes.append(f'eval: the built-in sets ({", ".join(s for s in specs if s not in kept)}) '
                   f'are not evaluated: they say nothing about your data; name your sets '
                   f'with --config.eval.{task}=...')
  return notes


def train_caption_tokenizer(config: ml_collections.ConfigDict, workdir: storage.PathLike
                            ) -> str | None:
  """A SentencePiece model trained on the training captions, when one is needed and missing.

  The model's vocabulary decides: OpenAI-sized text towers use the CLIP BPE; smaller
  ones a SentencePiece model, which `config.data.tokenizer.model_path` names. Without
  one, the first TOKENIZER_CAPTIONS captions of config.data.train train it into
  `<workdir>/tokenizer/` (once: a resumed run finds it). Returns a note, or None.
  """
  section = config.data.tokenizer
  if section.type != 'sentencepiece' or section.model_path:
    return None
  prefix = storage.join(workdir, TOKENIZER_DIR, 'captions')
  model_path = storage.resolve(f'{prefix}.model')
  if jax.process_index() == 0 and not storage.exists(model_path):
    from clip_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
    source = sources.Source.from_config(config.data.train, 'config.data.train',
                                        pipeline.read_policy(config.data))
    captions = list(sources.iterate_captions(source, TOKENIZER_CAPTIONS))
    tokenizers.train_sentencepiece(captions, prefix, config.model.text.vocab_size)
  _sync_processes('caption_tokenizer')
  section.model_path = str(model_path)
  return (f'tokenizer: SentencePiece (at most {config.model.text.vocab_size} ids) trained on '
          f'the captions of config.data.train: {model_path}')


def prepare_config(config: ml_collections.ConfigDict, workdir: storage.PathLike,
                   explicit: frozenset[str] = frozenset()
                   ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config this run uses, and notes for the console: validated, references
  resolved, the data chosen (`choose_data`), built-in data in place."""
  config = config.copy_and_resolve_references()
  config_lib.validate(config)
  validate_trainer_config(config)
  notes = choose_data(config, explicit)
  if config.builtin.enabled:
    use_builtin_data(config, workdir)
  return config, notes


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  text = config.model.text
  if tokenizer.context_length != text.context_length:
    raise ValueError(f'config.data.tokenizer.context_length: {tokenizer.context_length} but '
                     f'config.model.text.context_length is {text.context_length}')
  if tokenizer.vocab_size > text.vocab_size:
    raise ValueError(f'config.data.tokenizer: {tokenizer.vocab_size} token ids do not fit '
                     f'config.model.text.vocab_size={text.vocab_size}')
  if config.model.text_pool == 'eot_id' and tokenizer.eot_token_id != config.model.eot_token_id:
    raise ValueError(f'config.model.eot_token_id: {config.model.eot_token_id} but the tokenizer '
                     f'ends texts with id {tokenizer.eot_token_id}')


def dry_run_plan(config: ml_collections.ConfigDict, model: Any, layout: sharding.MeshLayout,
                 workdir: storage.PathLike, say: Callable[[str], None]) -> TrainResult:
  """What the run would do, from abstract shapes (nothing is allocated or trained)."""
  abstract, shardings = train_state_shardings(config, model, layout)
  stages = config_lib.training_stages(config)
  firsts = [1] + [stage.until_step + 1 for stage in stages[:-1]]
  schedule = '; '.join(f'steps {first}-{stage.until_step}: {stage.describe()}'
                       for first, stage in zip(firsts, stages))
  count = sum(int(math.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
  per_device = sum(
      int(math.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
      for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  latest = checkpoint.latest_step(workdir)
  say(f'dry run: {config.model.name}, {count:,} parameters; mesh {dict(layout.mesh.shape)} '
      f'over {jax.device_count()} {jax.devices()[0].platform} device(s); global batch '
      f'{config.batch_size} ({config.batch_size // layout.data_parallel_size} per '
      f'batch-carrying device), {config.total_steps} steps'
      + (f' in {len(stages)} stages ({schedule})' if config.train.stages else '')
      + f', loss {config.loss.name}, '
      f'{config.model.dtype} compute; train state {per_device / 2**30:.2f} GiB per device; '
      + (f'would resume from step {latest}' if latest is not None else 'would start at step 0')
      + f' in {workdir}. Every check passed; nothing was trained.')
  return TrainResult(0, False, {}, '')


# --- 2. restore --------------------------------------------------------------------------

def model_variables(state: TrainState) -> dict[str, Any]:
  """{'params', 'batch_stats' (ResNet only)}: what evaluation and export need."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def optimizer_item(state: TrainState) -> dict[str, Any]:
  """The rest of a TrainState that a checkpoint must hold (empty subtrees left out)."""
  item = {'opt_state': state.opt_state}
  if state.loss_params:
    item['loss_params'] = state.loss_params
  return item


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def restore_train_state(ckpt: checkpoint.TrainCheckpointer, step: int, config: Any,
                        model: Any, mesh: jax.sharding.Mesh | sharding.MeshLayout,
                        tx: Any = None) -> tuple[TrainState, TrainState, dict[str, Any]]:
  """(state, shardings, meta) of checkpoint `step`, laid out for `mesh` (`tx`: the
  run's optimizer, when built already)."""
  abstract, shardings = train_state_shardings(config, model, mesh, tx)
  target = _abstract(abstract, shardings)
  variables, opt_item, meta = ckpt.restore(step, model_variables(target), optimizer_item(target))
  state = TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step),
      params=variables['params'], loss_params=opt_item.get('loss_params', {}),
      opt_state=opt_item['opt_state'], batch_stats=variables.get('batch_stats', {}))
  return state, shardings, meta


# --- 3. the loop ---------------------------------------------------------------------

class StopSignal:
  """SIGTERM (a TPU preemption notice, `kill`) becomes a request to save and stop.

  Single-process runs catch the signal here; in multi-process runs JAX's distributed
  runtime receives it and `reached_preemption` makes every host stop at the same step.
  """

  def __init__(self, ckpt: checkpoint.TrainCheckpointer):
    self._ckpt = ckpt
    self._requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# A non-finite loss or gradient norm of step N means update N (the parameters a
# checkpoint of step N would hold) is not to be trusted.
FINITE_METRICS = ('loss', 'grad_norm')


def check_finite(step: int, values: dict[str, float], ckpt: checkpoint.TrainCheckpointer
                 ) -> None:
  """Raises FloatingPointError naming the step and the metric if one of FINITE_METRICS
  is NaN/Inf, after the saves in flight are finished (so the last good one is named)."""
  for name in FINITE_METRICS:
    if not math.isfinite(values[name]):
      ckpt.wait()
      last = ckpt.latest_step()
      kept = (f'the last good checkpoint is step {last} in {ckpt.directory}'
              if last is not None else 'no checkpoint was written')
      raise FloatingPointError(
          f'{name} is {values[name]} at step {step}: training stopped; {kept}. Lower '
          'config.optim.learning_rate, raise config.optim.warmup_steps or check the data')


def host_metrics(step: int, metrics: dict[str, jax.Array], ckpt: checkpoint.TrainCheckpointer
                 ) -> dict[str, float]:
  """Step `step`'s metrics on the host (one transfer), checked by `check_finite`."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  check_finite(step, values, ckpt)
  return values


def step_flops_and_peak(config: Any, stage: config_lib.Stage | None = None
                        ) -> tuple[float, float | None]:
  """Model FLOPs of one step of `stage` (default: the first of config.train.stages) and the
  peak FLOP/s of all devices (None when unknown)."""
  stage = config_lib.training_stages(config)[0] if stage is None else stage
  per_step = float(flops.model_flops(
      config.model, config.batch_size, mask_ratio=stage.mask_ratio,
      image_size=stage.image_size, text_length=stage.text_length)['total'])
  peak = flops.peak_flops(jax.devices()[0], config.model.dtype)
  return per_step, (peak * jax.device_count() if peak else None)


def stage_line(stages: tuple[config_lib.Stage, ...], index: int, resumed_at: int | None = None
               ) -> str:
  """'stage 2/2 from step 801: mask 0.0, 224 px, 77 tokens' (+ where a resume joined it)."""
  first = stages[index - 1].until_step + 1 if index else 1
  joined = f' (resumed at step {resumed_at})' if resumed_at not in (None, first) else ''
  return f'stage {index + 1}/{len(stages)} from step {first}{joined}: {stages[index].describe()}'


class Profiler:
  """A jax.profiler trace of steps first..last (config.log.profile_steps) -> workdir/profile.

  The profiler writes local files only: on a bucket the trace is made in a temporary
  directory and copied up when it stops.
  """

  def __init__(self, steps: tuple[int, ...], workdir: storage.PathLike,
               say: Callable[[str], None]):
    self.first, self.last = (steps if steps else (0, -1))
    self.logdir = storage.join(workdir, 'profile')
    self.say = say
    self._trace: contextlib.ExitStack | None = None

  def before(self, step: int) -> None:
    if step == self.first:
      self._trace = contextlib.ExitStack()
      jax.profiler.start_trace(self._trace.enter_context(storage.local_dir(self.logdir)))

  def after(self, step: int, state: Any) -> None:
    if self._trace is not None and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self._trace.close()
      self._trace = None
      self.say(f'profile of steps {self.first}-{self.last} written to {self.logdir}')


def evaluate_train_state(config: Any, model: Any, state: TrainState, mesh: Any, tokenizer: Any,
                         workdir: storage.PathLike, step: int) -> dict[str, float]:
  if not (config.eval.zeroshot or config.eval.retrieval or config.eval.linear_probe):
    return {}
  from clip_jax.evaluate.run import run_evaluations  # pylint: disable=import-outside-toplevel
  return run_evaluations(config.eval, model, model_variables(state), mesh, tokenizer,
                         workdir=workdir, step=step)


def zeroshot_summary(results: dict[str, float]) -> str:
  """One line per zero-shot top-1 and per text->image R@1, built-in sets next to chance;
  'zero-shot top-1 on held-out: 41.2% (chance 2.8%)' comes last, as the headline."""
  # pylint: disable=import-outside-toplevel
  from clip_jax.data import builtin
  from clip_jax.evaluate.datasets import builtin_name, builtin_summary
  lines, headline = [], []
  for key, value in results.items():
    task, dataset, metric = key.split('/', 2)
    if (task, metric) == ('zeroshot', 'top1'):
      what, chance = 'zero-shot top-1', 100.0 / len(builtin.class_names())
    elif (task, metric) == ('retrieval', 'text_to_image_R1'):
      what, chance = 'text->image R@1', 100.0 / results[f'{task}/{dataset}/num_examples']
    else:
      continue
    name = builtin_summary(dataset)
    line = (f'{what} on {name}: {value:.1f}% (chance {chance:.1f}%)' if name
            else f'{what} on {dataset}: {value:.1f}%')
    is_headline = task == 'zeroshot' and dataset == builtin_name('builtin', 'test')
    (headline if is_headline else lines).append(line)
  return '\n'.join(lines + headline)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: storage.PathLike, *,
                       explicit: frozenset[str] = frozenset(), dry_run: bool = False
                       ) -> TrainResult:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  `workdir` is a local directory (relative to the current one) or a URL (`gs://...`).
  `explicit`: the config keys the user set on the command line ('data.train.pattern'),
  which win over what the config file implies. `dry_run`: set up and check
  everything, print the plan, train nothing.
  """
  run_start = time.time()
  workdir = storage.resolve(workdir)
  is_main = jax.process_index() == 0
  say = lambda line: print(line, flush=True) if is_main else None  # noqa: E731

  # 1. Setup: every check before anything is trained (clip_jax.preflight).
  config, notes = prepare_config(config, workdir, explicit)
  preflight.check_mesh(config)
  notes += preflight.check_intervals(config)
  checkpoint.check_compatible(workdir, config)
  preflight.check_workdir_writable(workdir)
  layout = sharding.layout_from_config(config.mesh)   # the mesh and its axes' roles
  preflight.check_batch_sizes(config, layout)
  preflight.check_train_data(config)
  notes.append(train_caption_tokenizer(config, workdir))
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  check_tokenizer(config, tokenizer)
  preflight.check_eval_data(config, layout, tokenizer)
  model = build_model(config.model)
  for note in filter(None, notes):
    say(note)
  if dry_run:
    return dry_run_plan(config, model, layout, workdir, say)
  config_path = checkpoint.write_config(workdir, config)
  say(f'{config.model.name}: mesh {dict(layout.mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s), global batch {config.batch_size}, '
      f'{config.total_steps} steps; config written to {config_path}')

  # 2. Restore, or start.
  ckpt = checkpoint.TrainCheckpointer(
      workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
      keep_every=config.checkpoint.keep_every, async_save=config.checkpoint.async_save)
  latest = ckpt.latest_step()
  data_state = None
  tx = make_optimizer(config)     # once: the state's init and the step share it
  if latest is None:
    state, shardings = create_train_state(config, model, layout, jax.random.key(config.seed),
                                          tx)
    start_step = 0
  else:
    state, shardings, meta = restore_train_state(ckpt, latest, config, model, layout, tx)
    data_state, start_step = meta.get('data'), latest
    say(f'resumed from step {latest} ({ckpt.directory / str(latest)})')
  # The decay / LR multiplier / freezing table at INFO; the placement of every array,
  # as long again, at DEBUG (--verbosity=1).
  table = describe_train_state(config, state, shardings)
  placement = table.index(PLACEMENT_HEADER) if PLACEMENT_HEADER in table else len(table)
  logging.info('parameter groups:\n%s', '\n'.join(table[:placement]))
  logging.debug('%s', '\n'.join(table[placement:]))

  from clip_jax.data.pipeline import make_train_iterator  # pylint: disable=import-outside-toplevel
  stages = config_lib.training_stages(config)

  def open_batches(stage: config_lib.Stage, position: Any) -> delivery.MeshPrefetcher:
    """Global batches at the stage's image size and text length, from `position` (the
    data was checked readable by preflight.check_train_data)."""
    return delivery.prefetch_to_mesh(
        make_train_iterator(config, tokenizer, state=position, image_size=stage.image_size,
                            text_length=stage.text_length, check=False),
        layout, size=max(1, int(config.data.device_prefetch)))

  # One jitted step per distinct stage setting, each compiled once (its shapes are fixed).
  steps_by_setting: dict[tuple[float, int, int], Callable] = {}

  writer = MetricsWriter(workdir, config.log, config.total_steps, active=is_main)
  stop = StopSignal(ckpt)
  profiler = Profiler(tuple(config.log.profile_steps), workdir, say)
  batches: delivery.MeshPrefetcher | None = None

  def save(step: int, state: TrainState, loss: float, force: bool) -> None:
    # `force`: the last step and a preemption are saved whatever the interval says;
    # orbax's policy (ckpt.should_save) decides the regular saves.
    # The data position after the last batch taken: exactly where a resumed run goes on.
    # Every host reads its own files, so every host's position is saved (a collective).
    meta = {'data': delivery.all_host_states(batches.state_dict()), 'loss': loss,
            'num_skipped': batches.num_skipped}
    ckpt.save(step, model_variables(state), optimizer_item(state), meta, force=force)

  # 3. The loop. Each step's metrics come to the host once (host_metrics, which checks
  # them): one step later, so reading them never stalls the device queue, or at once at
  # log and save steps, so a checkpoint of step N is written after step N's check.
  step, pending, preempted = start_step, None, False
  interval_start, interval_steps = time.time(), 0
  current = None                  # the index of the stage running
  try:
    while step < config.total_steps:
      index = config_lib.stage_index(stages, step + 1)
      stage_begins, compiles = index != current, False
      if stage_begins:
        # A new stage: the stream goes on from where the last batch taken left it (the
        # checkpoint's position when resuming), at the stage's image size and text length.
        stage, current, stage_start = stages[index], index, time.time()
        if config.train.stages:
          say(stage_line(stages, index, resumed_at=step + 1 if step == start_step else None))
        position = data_state if batches is None else batches.state_dict()
        if batches is not None:
          batches.close()
        batches = open_batches(stage, position)
        compiles = stage.settings not in steps_by_setting
        if compiles:
          steps_by_setting[stage.settings] = make_train_step(
              config, model, layout, shardings, tx, mask_ratio=stage.mask_ratio)
        train_step = steps_by_setting[stage.settings]
        flops_per_step, peak = step_flops_and_peak(config, stage)
      profiler.before(step + 1)
      batch = next(batches)
      state, metrics = train_step(state, batch)
      step += 1
      profiler.after(step, state)
      if pending is not None:
        host_metrics(*pending, ckpt)
      pending = (step, metrics)
      if stage_begins:
        # A compile and a stream (re)start are kept out of the images/s of the interval.
        jax.block_until_ready(metrics)
        if compiles:
          say(f'step {step}: compiled and ran in {time.time() - stage_start:.1f}s')
        interval_start, interval_steps = time.time(), 0
      else:
        interval_steps += 1
      writer.progress(step)

      preempted = stop.requested(step)
      is_last = step == config.total_steps
      is_log = step % config.log.every_steps == 0 or is_last or preempted
      is_save = ckpt.should_save(step) or is_last or preempted
      if is_log or is_save:
        values, pending = host_metrics(step, metrics, ckpt), None
      if is_log:
        elapsed = time.time() - interval_start
        rate = interval_steps / elapsed if interval_steps and elapsed > 0 else 0.0
        if rate:
          values[IMAGES_PER_SECOND] = rate * config.batch_size
          if peak:
            values[MFU] = flops_per_step * rate / peak
        values[DATA_SKIPPED] = float(batches.num_skipped)
        writer.write(step, values, console_line(step, config.total_steps, values,
                                                time.time() - run_start, rate))
        interval_start, interval_steps = time.time(), 0
      if config.eval.every_steps and step % config.eval.every_steps == 0 and not is_last:
        results = evaluate_train_state(config, model, state, layout, tokenizer, workdir, step)
        if results:
          writer.write(step, {f'{EVAL_PREFIX}{k}': v for k, v in results.items()})
        interval_start, interval_steps = time.time(), 0
      if is_save:
        save(step, state, values['loss'], force=is_last or preempted)
      if preempted:
        ckpt.wait()
        writer.print(f'stop requested (SIGTERM) at step {step}: checkpoint saved to '
                     f'{ckpt.directory / str(step)}; run the same command to resume')
        break
  except BaseException:
    writer.close()
    raise
  finally:
    stop.close()
    if batches is not None:
      batches.close()
    ckpt.close()

  if preempted:
    writer.close()
    return TrainResult(step, True, {}, '')
  if start_step >= config.total_steps:
    say(f'training already complete at step {start_step} (config.total_steps='
        f'{config.total_steps}); evaluating')

  # 4. Evaluate.
  try:
    results = evaluate_train_state(config, model, state, layout, tokenizer, workdir, step)
    if results:
      writer.write(step, {f'{EVAL_PREFIX}{k}': v for k, v in results.items()})
  finally:
    writer.close()
  say(f'done: {step} steps in {format_duration(time.time() - run_start)}; checkpoints in '
      f'{ckpt.directory}, metrics in {workdir / METRICS_FILE}'
      + (f', TensorBoard in {workdir / TENSORBOARD_DIR}' if config.log.tensorboard else ''))
  summary = zeroshot_summary(results)
  if summary:
    say(summary)
  return TrainResult(step, False, results, summary)


def loss_history(workdir: storage.PathLike) -> dict[int, float]:
  """step -> loss of the logged steps in `workdir/metrics.jsonl` (later lines win)."""
  history = {}
  path = storage.join(workdir, METRICS_FILE)
  if path.exists():
    for line in storage.read_text(path).splitlines():
      record = json.loads(line)
      if 'loss' in record:
        history[int(record['step'])] = float(record['loss'])
  return history

