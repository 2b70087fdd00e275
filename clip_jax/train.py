"""The trainer, readable top to bottom: setup, restore, loop, evaluate, save.

    train_and_evaluate(config, workdir)

1. Setup: validate the config (built-in data written if asked), refuse a workdir of
   another architecture, write `config.json`, build the mesh, model and tokenizer.
2. Restore: the latest checkpoint under `workdir/checkpoints` if there is one
   (parameters, optimizer state and the data position, onto the current mesh,
   whatever mesh wrote it); otherwise a fresh, directly sharded state.
3. Loop: prefetched global batches -> the jitted sharded step. Every
   `config.log.every_steps` a console line, `metrics.jsonl` and TensorBoard;
   every `config.eval.every_steps` an evaluation; checkpoints every
   `config.checkpoint.every_steps`, at the end, and on SIGTERM (then it returns).
   A NaN/Inf loss stops the run, naming the step; the last checkpoint stays the
   last good one (a step's loss is checked before its state is saved).
4. Evaluate: `config.eval` through clip_jax.evaluate; the last printed line is the
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

from clip_jax import checkpoint, sharding, storage
from clip_jax import config as config_lib
from clip_jax.data import delivery, tokenizers
from clip_jax.metrics_writer import (METRICS_FILE, TENSORBOARD_DIR, MetricsWriter,
                                     console_line, format_duration)
from clip_jax.models.clip import build_model
from clip_jax.train_step import (TrainState, create_train_state, describe_train_state,
                                 make_train_step, train_state_shardings)

BUILTIN_DATASET = 'builtin_test'   # clip_jax.evaluate's name of the held-out scenes


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


def prepare_config(config: ml_collections.ConfigDict, workdir: storage.PathLike
                   ) -> ml_collections.ConfigDict:
  """The config this run uses: validated, references resolved, built-in data in place."""
  config = config.copy_and_resolve_references()
  config_lib.validate(config)
  validate_trainer_config(config)
  if config.builtin.enabled:
    use_builtin_data(config, workdir)
  return config


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
                        model: Any, mesh: jax.sharding.Mesh
                        ) -> tuple[TrainState, TrainState, dict[str, Any]]:
  """(state, shardings, meta) of checkpoint `step`, laid out for `mesh`."""
  abstract, shardings = train_state_shardings(config, model, mesh)
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


def check_finite(step: int, loss: float, ckpt: checkpoint.TrainCheckpointer) -> None:
  if not math.isfinite(loss):
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (f'the last good checkpoint is step {last} in {ckpt.directory}' if last is not None
            else 'no checkpoint was written')
    raise FloatingPointError(
        f'loss is {loss} at step {step}: training stopped; {kept}. Lower '
        'config.optim.learning_rate, raise config.optim.warmup_steps or check the data')


def step_flops_and_peak(config: Any) -> tuple[float, float | None]:
  """Model FLOPs of one step and the peak FLOP/s of all devices (None when unknown)."""
  from clip_jax import benchmark  # pylint: disable=import-outside-toplevel
  flops = float(benchmark.model_flops(config.model, config.batch_size)['total'])
  peak = benchmark.peak_flops(jax.devices()[0], config.model.dtype)
  return flops, (peak * jax.device_count() if peak else None)


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


def evaluate(config: Any, model: Any, state: TrainState, mesh: Any, tokenizer: Any,
             workdir: storage.PathLike, step: int) -> dict[str, float]:
  if not (config.eval.zeroshot or config.eval.retrieval or config.eval.linear_probe):
    return {}
  from clip_jax.evaluate.run import run_evaluations  # pylint: disable=import-outside-toplevel
  return run_evaluations(config.eval, model, model_variables(state), mesh, tokenizer,
                         workdir=workdir, step=step)


def zeroshot_summary(results: dict[str, float]) -> str:
  """'zero-shot top-1 on held-out: 41.2% (chance 2.8%)', one line per zero-shot dataset."""
  lines = []
  for key, value in results.items():
    task, dataset, metric = key.split('/', 2)
    if task != 'zeroshot' or metric != 'top1':
      continue
    if dataset == BUILTIN_DATASET:
      from clip_jax.data import builtin  # pylint: disable=import-outside-toplevel
      chance = 100.0 / len(builtin.class_names())
      lines.append(f'zero-shot top-1 on held-out: {value:.1f}% (chance {chance:.1f}%)')
    else:
      lines.append(f'zero-shot top-1 on {dataset}: {value:.1f}%')
  return '\n'.join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: storage.PathLike
                       ) -> TrainResult:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  `workdir` is a local directory (relative to the current one) or a URL (`gs://...`).
  """
  run_start = time.time()
  workdir = storage.resolve(workdir)
  is_main = jax.process_index() == 0
  say = lambda line: print(line, flush=True) if is_main else None  # noqa: E731

  # 1. Setup.
  config = prepare_config(config, workdir)
  checkpoint.check_compatible(workdir, config)
  config_path = checkpoint.write_config(workdir, config)
  mesh = sharding.mesh_from_config(config.mesh)
  model = build_model(config.model)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  check_tokenizer(config, tokenizer)
  say(f'{config.model.name}: mesh {dict(mesh.shape)} over {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s), global batch {config.batch_size}, '
      f'{config.total_steps} steps; config written to {config_path}')

  # 2. Restore, or start.
  ckpt = checkpoint.TrainCheckpointer(
      workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
      keep_every=config.checkpoint.keep_every, async_save=config.checkpoint.async_save)
  latest = ckpt.latest_step()
  data_state = None
  if latest is None:
    state, shardings = create_train_state(config, model, mesh, jax.random.key(config.seed))
    start_step = 0
  else:
    state, shardings, meta = restore_train_state(ckpt, latest, config, model, mesh)
    data_state, start_step = meta.get('data'), latest
    say(f'resumed from step {latest} ({ckpt.directory / str(latest)})')
  for line in describe_train_state(config, state, shardings):
    logging.debug("%s", line)

  from clip_jax.data.pipeline import make_train_iterator  # pylint: disable=import-outside-toplevel
  batches = delivery.prefetch_to_mesh(
      make_train_iterator(config, tokenizer, state=data_state), mesh,
      size=max(1, int(config.data.device_prefetch)))
  train_step = make_train_step(config, model, mesh, shardings)
  writer = MetricsWriter(workdir, config.log, config.total_steps, active=is_main)
  stop = StopSignal(ckpt)
  profiler = Profiler(tuple(config.log.profile_steps), workdir, say)
  flops_per_step, peak = step_flops_and_peak(config)

  def save(step: int, state: TrainState, loss: float) -> None:
    # The data position after the last batch taken: exactly where a resumed run goes on.
    # Every host reads its own files, so every host's position is saved (a collective).
    meta = {'data': delivery.all_host_states(batches.state_dict()), 'loss': loss,
            'num_skipped': batches.num_skipped}
    ckpt.save(step, model_variables(state), optimizer_item(state), meta, force=True)

  # 3. The loop. A step's metrics are read one step later, so reading them never
  # stalls the device queue; at log and save steps they are read at once.
  step, pending, preempted = start_step, None, False
  interval_start, interval_steps, loop_start = time.time(), 0, time.time()
  try:
    while step < config.total_steps:
      profiler.before(step + 1)
      batch = next(batches)
      state, metrics = train_step(state, batch)
      step += 1
      profiler.after(step, state)
      if pending is not None:
        check_finite(pending[0], float(pending[1]['loss']), ckpt)
      pending = (step, metrics)
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        say(f'step {step}: compiled and ran in {time.time() - loop_start:.1f}s')
        interval_start, interval_steps = time.time(), 0
      else:
        interval_steps += 1
      writer.progress(step)

      preempted = stop.requested(step)
      is_last = step == config.total_steps
      if step % config.log.every_steps == 0 or is_last or preempted:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, values['loss'], ckpt)
        elapsed = time.time() - interval_start
        rate = interval_steps / elapsed if interval_steps and elapsed > 0 else 0.0
        if rate:
          values['images_per_second'] = rate * config.batch_size
          if peak:
            values['mfu'] = flops_per_step * rate / peak
        values['data_skipped'] = float(batches.num_skipped)
        writer.write(step, values, console_line(step, config.total_steps, values,
                                                time.time() - run_start, rate))
        interval_start, interval_steps = time.time(), 0
      if config.eval.every_steps and step % config.eval.every_steps == 0 and not is_last:
        results = evaluate(config, model, state, mesh, tokenizer, workdir, step)
        if results:
          writer.write(step, {f'eval/{k}': v for k, v in results.items()})
        interval_start, interval_steps = time.time(), 0
      if ckpt.should_save(step) or is_last or preempted:
        loss = float(jax.device_get(metrics['loss']))
        check_finite(step, loss, ckpt)
        save(step, state, loss)
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
    results = evaluate(config, model, state, mesh, tokenizer, workdir, step)
    if results:
      writer.write(step, {f'eval/{k}': v for k, v in results.items()})
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

