"""The trainer end to end on 8 fake devices: tiny on the built-in shards through tf.data.

Preemption and crash tests run `python -m clip_jax.main` in a subprocess (kill -9,
SIGTERM) and compare the resumed run's losses with an uninterrupted one.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import checkpoint, train
from clip_jax.data import builtin
from clip_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
# Small, quick settings shared by the in-process and the subprocess runs.
TEST_SETTINGS = {'batch_size': 64, 'builtin.num_train': 1024, 'data.shuffle_buffer': 500,
                 'eval.zeroshot': '', 'eval.retrieval': '', 'log.every_steps': 1,
                 'checkpoint.every_steps': 10}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The built-in scenes, written once for every test here (runs find and reuse them)."""
  path = str(tmp_path_factory.mktemp('builtin'))
  builtin.prepare(path, num_train=TEST_SETTINGS['builtin.num_train'], seed=0, image_size=32,
                  num_shards=8, vocab_size=512, captions_per_image=3)
  return path


def tiny_config(data_dir, **overrides):
  spec = importlib.util.spec_from_file_location('tiny_config', TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  settings = dict(TEST_SETTINGS, **{'builtin.dir': data_dir})
  settings.update({k.replace('__', '.'): v for k, v in overrides.items()})
  for key, value in settings.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


def main_command(workdir, data_dir, **overrides):
  settings = dict(TEST_SETTINGS, **{'builtin.dir': data_dir})
  settings.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return [sys.executable, '-m', 'clip_jax.main', f'--config={TINY}', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in settings.items()]]


def start_main(workdir, data_dir, env, **overrides):
  """`python -m clip_jax.main` in the background, its output appended to `<workdir>.log`."""
  with open(str(workdir) + '.log', 'a') as log:
    return subprocess.Popen(main_command(workdir, data_dir, **overrides), cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process, timeout=240, what=''):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if process.poll() is not None:
      raise AssertionError(f'the training process ended (rc {process.returncode}) before {what}')
    time.sleep(0.05)
  process.kill()
  raise AssertionError(f'timed out waiting for {what}')


def saved_steps(workdir):
  """Steps with a finished checkpoint directory (unfinished ones carry a tmp suffix)."""
  folder = os.path.join(str(workdir), 'checkpoints')
  return [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []


def logged_steps(workdir):
  return max(train.loss_history(str(workdir)) or [0])


@pytest.mark.slow
def test_end_to_end_loss_falls_and_everything_is_written(tmp_path, data_dir, capsys):
  config = tiny_config(data_dir, total_steps=200, log__every_steps=10,
                       checkpoint__every_steps=100, eval__zeroshot='builtin',
                       eval__max_examples=128, eval__batch_size=64)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.step == 200 and not result.preempted
  losses = train.loss_history(str(tmp_path))
  assert sorted(losses) == list(range(10, 201, 10))
  first, last = losses[10], np.mean([losses[s] for s in (180, 190, 200)])
  assert last < first - 0.7, losses
  # The last printed line is the zero-shot accuracy next to chance.
  out = capsys.readouterr().out.strip().splitlines()
  assert re.fullmatch(r'zero-shot top-1 on held-out: \d+\.\d% \(chance 2\.8%\)', out[-1]), out[-3:]
  assert result.eval_results['zeroshot/builtin_test/num_examples'] == 128
  # Workdir: resolved config (pointing at the shards), checkpoints, TensorBoard, metrics.
  stored = json.loads((tmp_path / 'config.json').read_text())
  assert stored['data']['train']['pattern'].endswith('scenes-*.tfrecord')
  assert stored['data']['tokenizer']['model_path'].endswith('tokenizer.model')
  assert checkpoint.latest_step(tmp_path) == 200
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['100', '200']
  assert os.listdir(tmp_path / 'tensorboard')
  record = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[-1])
  assert record['step'] == 200 and 'eval/zeroshot/builtin_test/top1' in record
  # The trained model loads with the model-only reader.
  loaded_config, variables = checkpoint.load_model(tmp_path)
  assert loaded_config.model.name == 'tiny' and 'params' in variables


def test_resume_onto_another_mesh(tmp_path, data_dir, capsys):
  first = tiny_config(data_dir, total_steps=4, checkpoint__every_steps=4,
                      log__profile_steps=(2, 3))
  train.train_and_evaluate(first, str(tmp_path))
  traces = [f for _, _, files in os.walk(tmp_path / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces
  _, saved = checkpoint.load_model(tmp_path)
  second = tiny_config(data_dir, total_steps=6, checkpoint__every_steps=4)
  second.mesh.shape = (2, 4, 1)
  # The restored state is the saved one, laid out for the new mesh (FSDP over 4).
  mesh = jax.make_mesh((2, 4, 1), ('data', 'fsdp', 'model'))
  prepared, _ = train.prepare_config(second, str(tmp_path))
  model = build_model(prepared.model)
  with checkpoint.TrainCheckpointer(tmp_path, every_steps=4) as ckpt:
    state, _, meta = train.restore_train_state(ckpt, 4, prepared, model, mesh)
  kernel = state.params['visual']['transformer']['resblocks_0']['mlp']['c_fc']['kernel']
  assert kernel.sharding.mesh.shape == {'data': 2, 'fsdp': 4, 'model': 1}
  assert 'fsdp' in jax.tree.leaves(tuple(kernel.sharding.spec)) and kernel.sharding.spec != P()
  np.testing.assert_array_equal(
      kernel, saved['params']['visual']['transformer']['resblocks_0']['mlp']['c_fc']['kernel'])
  # Every host's data position (one host here), each exactly after the 4 batches taken.
  assert int(state.step) == 4 and meta['data']['hosts']['0']['emitted'] == 4 * 64
  capsys.readouterr()
  result = train.train_and_evaluate(second, str(tmp_path))
  assert 'resumed from step 4' in capsys.readouterr().out
  assert result.step == 6 and checkpoint.latest_step(tmp_path) == 6
  assert all(np.isfinite(v) for v in train.loss_history(str(tmp_path)).values())
  # Running again: nothing left to train, and it says so.
  again = train.train_and_evaluate(second, str(tmp_path))
  assert again.step == 6
  assert 'training already complete at step 6' in capsys.readouterr().out


def poison_step(monkeypatch, at_step, poison):
  """The trainer's step, with `poison(state, metrics) -> (state, metrics)` applied to
  what update `at_step` returns."""
  real_make_train_step = train.make_train_step

  def make_train_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)

    def poisoned(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == at_step:
        state, metrics = poison(state, metrics)
      return state, metrics
    return poisoned

  monkeypatch.setattr(train, 'make_train_step', make_train_step)


def nan_params(state):
  return state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
  config = tiny_config(data_dir, total_steps=20, checkpoint__every_steps=2)
  # Update 5 turns the weights into NaN, as an exploding update would.
  poison_step(monkeypatch, 5, lambda state, metrics: (nan_params(state), metrics))
  with pytest.raises(FloatingPointError, match=r'loss is nan at step (\d+): training stopped; '
                     r'the last good checkpoint is step (\d+)') as error:
    train.train_and_evaluate(config, str(tmp_path))
  nan_step, kept = map(int, re.search(r'step (\d+):.*step (\d+) in', str(error.value)).groups())
  assert nan_step == 6 and kept == 4 and checkpoint.latest_step(tmp_path) == kept
  _, variables = checkpoint.load_model(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


def test_a_non_finite_grad_norm_stops_before_its_checkpoint(tmp_path, data_dir, monkeypatch,
                                                           capsys):
  """Update 4 overflows (its gradient norm is inf, the weights NaN) while its loss, computed
  before the update, is still finite: checkpoint 4 would hold the broken weights, so the
  run stops before writing it. The run also uses renamed mesh axes: the trainer reads
  every axis role from config.mesh."""
  config = tiny_config(data_dir, total_steps=20, checkpoint__every_steps=2,
                       mesh__shape=(2, 2, 2), mesh__axes=('replica', 'shard', 'tensor'),
                       mesh__batch_axes=('replica', 'shard'), mesh__fsdp_axis='shard',
                       mesh__logical_rules=(('heads', 'tensor'), ('mlp', 'tensor')))
  poison_step(monkeypatch, 4, lambda state, metrics: (nan_params(state),
                                                      dict(metrics, grad_norm=np.inf)))
  with pytest.raises(FloatingPointError, match=r'grad_norm is inf at step 4: training stopped; '
                     r'the last good checkpoint is step 2 in'):
    train.train_and_evaluate(config, str(tmp_path))
  assert saved_steps(tmp_path) == [2] and checkpoint.latest_step(tmp_path) == 2
  assert "mesh {'replica': 2, 'shard': 2, 'tensor': 2}" in capsys.readouterr().out
  assert sorted(train.loss_history(str(tmp_path))) == [1, 2, 3]   # step 4 is never logged


def test_bad_config_and_foreign_workdir_are_refused(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config.optim.learnin_rate = 1.0
  with pytest.raises(ValueError, match=r'config\.optim\.learnin_rate'):
    train.prepare_config(config, str(tmp_path))
  for key, value, message in (('total_steps', 0, r'config\.total_steps: expected a positive'),
                              ('log.profile_steps', (5, 2), r'config\.log\.profile_steps'),
                              ('eval.every_steps', -1, r'config\.eval\.every_steps')):
    config = tiny_config(data_dir, **{key.replace('.', '__'): value})
    with pytest.raises(ValueError, match=message):
      train.prepare_config(config, str(tmp_path))
  # A workdir written by another architecture is refused before anything is built.
  other = tiny_config(data_dir)
  other.model.vision.width = 32
  checkpoint.write_config(tmp_path, other)
  with pytest.raises(ValueError, match=r"written by architecture 'tiny'.*config\.model\.vision"):
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))


@pytest.mark.slow
def test_sigterm_and_kill_9_then_restart_match_an_uninterrupted_run(tmp_path, data_dir):
  steps = dict(total_steps=30, checkpoint__every_steps=10)
  # The four runs compile the same programs: JAX's persistent cache compiles them once.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  reference = tmp_path / 'uninterrupted'
  uninterrupted = subprocess.run(main_command(reference, data_dir, **steps), cwd=REPO, env=env,
                                 timeout=300, capture_output=True, text=True)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  expected = train.loss_history(str(reference))
  assert sorted(expected) == list(range(1, 31))
  workdir = tmp_path / 'interrupted'

  # 1. SIGTERM (a preemption notice): a checkpoint of the current step, exit status 0.
  process = start_main(workdir, data_dir, env, **steps)
  wait_for(lambda: logged_steps(workdir) >= 3, process, what='step 3')
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  log = open(str(workdir) + '.log').read()
  stopped = int(re.search(r'stop requested \(SIGTERM\) at step (\d+): checkpoint saved', log)
                .group(1))
  assert 3 <= stopped < 30 and checkpoint.latest_step(workdir) == stopped

  # 2. The same command resumes there; kill -9 (no chance to save) after the next checkpoint.
  process = start_main(workdir, data_dir, env, **steps)
  next_checkpoint = (stopped // 10 + 1) * 10
  wait_for(lambda: max(saved_steps(workdir) or [0]) >= next_checkpoint
           and logged_steps(workdir) >= next_checkpoint + 3, process,
           what=f'step {next_checkpoint + 3} and the checkpoint of step {next_checkpoint}')
  process.kill()
  process.wait()
  log = open(str(workdir) + '.log').read()
  assert f'resumed from step {stopped}' in log
  killed_at = logged_steps(workdir)

  # 3. Again the same command: resumes from the last complete checkpoint and finishes.
  restarted = subprocess.run(main_command(workdir, data_dir, **steps), cwd=REPO, env=env,
                             timeout=300, capture_output=True, text=True)
  assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
  resumed = int(re.search(r'resumed from step (\d+)', restarted.stdout).group(1))
  assert next_checkpoint <= resumed <= killed_at
  # Every step's loss, before and after both interruptions, is the uninterrupted run's.
  got = train.loss_history(str(workdir))
  assert sorted(got) == list(range(1, 31))
  for step in range(1, 31):
    assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])
