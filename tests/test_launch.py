"""The launch scripts: shellcheck, every script's --dry-run commands, the TPU watch loop
against a fake gcloud (preemption, crashed job, finished job), and the worker-side job
control run for real on this machine."""

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / 'launch' / 'tpu'
GPU = REPO / 'launch' / 'gpu'
SCRIPTS = sorted(TPU.glob('*.sh')) + sorted(GPU.glob('*.sh')) + sorted(GPU.glob('*.sbatch'))
SHELLCHECK = pathlib.Path(sys.executable).parent / 'shellcheck'

ZONE_FLAGS = ['--zone=us-central2-b', '--project=my-project', '--name=pod']
WORKDIR = 'gs://bucket/runs/vit'


def _env(**extra):
  # No settings leak in from the caller's environment.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'CLIP_JAX_', 'SLURM_', 'DRY_RUN', 'WATCH_', 'JAX_LOCAL'))}
  env.update(extra)
  return env


def _run(script, *args, env=None, check=True):
  result = subprocess.run(['bash', str(script), *args], capture_output=True, text=True,
                          env=env or _env(), cwd=REPO, timeout=60)
  if check and result.returncode:
    raise AssertionError(f'{script.name} {args} failed ({result.returncode}):\n{result.stderr}')
  return result


def _commands(result):
  """The commands a TPU script printed (`+ cmd` lines), split into words."""
  return [shlex.split(line[2:]) for line in result.stderr.splitlines() if line.startswith('+ ')]


def _flag(command, name):
  values = [w.split('=', 1)[1] for w in command if w.startswith(f'--{name}=')]
  assert len(values) == 1, (name, command)
  return values[0]


def test_shellcheck_passes_on_every_script():
  assert len(SCRIPTS) >= 9, SCRIPTS
  result = subprocess.run([str(SHELLCHECK), '-x', '-P', 'SCRIPTDIR', *map(str, SCRIPTS)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s.name != 'common.sh'],
                         ids=lambda p: p.name)
def test_every_script_has_help(script):
  result = _run(script, '--help', env=_env(TPU_ZONE='z'))
  assert script.name in result.stdout or 'worker.sh' in result.stdout, result.stdout
  if script.name != 'worker.sh':
    assert '--dry-run' in result.stdout, result.stdout


def test_create_direct_and_queued_spot():
  direct = _commands(_run(TPU / 'create.sh', *ZONE_FLAGS, '--accelerator-type=v5p-64',
                          '--spot', '--dry-run'))
  assert len(direct) == 1
  cmd = direct[0]
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod']
  assert _flag(cmd, 'zone') == 'us-central2-b' and _flag(cmd, 'project') == 'my-project'
  assert _flag(cmd, 'accelerator-type') == 'v5p-64'
  assert _flag(cmd, 'version') == 'v2-alpha-tpuv5'   # default runtime for v5p
  assert '--spot' in cmd

  # Settings from the environment; a queued resource waits for capacity.
  env = _env(TPU_ZONE='europe-west4-a', TPU_NAME='q', TPU_ACCELERATOR_TYPE='v6e-256',
             TPU_QUEUED='1', TPU_RUNTIME_VERSION='v2-alpha-tpuv6e', DRY_RUN='1')
  queued = _commands(_run(TPU / 'create.sh', env=env))
  assert len(queued) == 1
  cmd = queued[0]
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'q']
  assert _flag(cmd, 'node-id') == 'q' and _flag(cmd, 'zone') == 'europe-west4-a'
  assert _flag(cmd, 'runtime-version') == 'v2-alpha-tpuv6e'
  assert _flag(cmd, 'accelerator-type') == 'v6e-256'
  assert '--spot' not in cmd and not any(w.startswith('--project') for w in cmd)


def test_setup_copies_the_checkout_and_installs_on_every_worker(tmp_path):
  cmds = _commands(_run(TPU / 'setup.sh', *ZONE_FLAGS, '--dry-run', env=_env(TMPDIR=str(tmp_path))))
  tar, scp, ssh = cmds
  # The archive holds git's file list (never a .venv or workdir inside the checkout).
  assert tar[0] == 'tar' and str(REPO) in tar and '-T' in tar and '--null' in tar
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert scp[5] == tar[2] and scp[6] == 'pod:clip_jax.tar.gz'
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and '--worker=all' in ssh
  remote = _flag(ssh, 'command')
  assert "pip install -q -e ~/clip_jax 'jax[tpu]'" in remote
  assert 'tar -xzf ~/clip_jax.tar.gz' in remote
  assert not (tmp_path / 'clip_jax_pod.tar.gz').exists()   # a dry run writes nothing


def test_setup_ships_the_checkout_as_it_is_now(tmp_path):
  """git's list, less tracked files deleted but not committed (tar would stop on them),
  plus untracked files that .gitignore does not name; never an ignored .venv."""
  checkout = tmp_path / 'clip_jax'
  subprocess.run(['git', 'clone', '-q', str(REPO), str(checkout)], check=True, timeout=120)
  (checkout / 'README.md').unlink()
  (checkout / 'my_notes.txt').write_text('untracked, not ignored\n')
  (checkout / '.venv').mkdir()
  (checkout / '.venv' / 'big').write_text('ignored\n')
  env, log = _fake_gcloud(tmp_path, states=[], jobs=[])
  _run(checkout / 'launch' / 'tpu' / 'setup.sh', *ZONE_FLAGS, env=env)
  with tarfile.open(tmp_path / 'clip_jax_pod.tar.gz') as archive:
    names = set(archive.getnames())
  assert 'my_notes.txt' in names and 'clip_jax/train.py' in names
  assert 'README.md' not in names and not any(n.startswith('.venv') for n in names)
  assert [' '.join(c[2:4]) for c in _calls(log)] == ['tpu-vm scp', 'tpu-vm ssh']


def _train_args(ssh_command):
  """The trainer argv a `worker.sh start` remote command would run."""
  words = shlex.split(_flag(ssh_command, 'command'))
  if words[0] == 'env':
    words = words[words.index('bash'):]
  assert words[:4] == ['bash', '~/clip_jax/launch/tpu/worker.sh', 'start', '--'], words
  return words[4:]


def test_train_runs_the_same_command_on_every_worker():
  result = _run(TPU / 'train.sh', *ZONE_FLAGS, '--config=configs/vit_b32.py',
                f'--workdir={WORKDIR}', '--data', 'gs://bucket/laion/{00000..00099}.tar',
                '--env=JAX_COMPILATION_CACHE_DIR=gs://bucket/cache', '--env', 'NOTE=a b',
                '--dry-run', '--', '--config.batch_size=4096', "--config.note=it's a test")
  (ssh,) = _commands(result)
  assert shlex.split(_flag(ssh, 'command'))[:4] == [
      'env', 'JAX_COMPILATION_CACHE_DIR=gs://bucket/cache', 'NOTE=a b', 'bash']
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  assert '--worker=all' in ssh
  assert _train_args(ssh) == [
      '--config=configs/vit_b32.py', f'--workdir={WORKDIR}',
      '--config.data.train.source=wds',
      '--config.data.train.pattern=gs://bucket/laion/{00000..00099}.tar',
      '--config.batch_size=4096', "--config.note=it's a test"]
  tfrecords = _run(TPU / 'train.sh', *ZONE_FLAGS, f'--workdir={WORKDIR}',
                   '--data=gs://bucket/cc12m/train-*.tfrecord', '--dry-run')
  assert _train_args(_commands(tfrecords)[0]) == [
      '--config=configs/vit_b32.py', f'--workdir={WORKDIR}',
      '--config.data.train.pattern=gs://bucket/cc12m/train-*.tfrecord']


# Parses trainer flags exactly as `python -m clip_jax.main` does (absl + config_flags).
PARSE_TRAINER_FLAGS = """
import json, sys
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file('config', None, lock_config=True)
flags.DEFINE_string('workdir', None, '')
def main(argv):
  c = flags.FLAGS.config
  print(json.dumps(dict(workdir=flags.FLAGS.workdir, model=c.model.name, batch_size=c.batch_size,
                        source=c.data.train.source, pattern=c.data.train.pattern,
                        mesh=list(c.mesh.shape))))
app.run(main)
"""


def test_the_training_command_is_one_the_trainer_accepts():
  (ssh,) = _commands(_run(TPU / 'train.sh', *ZONE_FLAGS, f'--workdir={WORKDIR}',
                          '--data=gs://bucket/laion/{00000..00099}.tar', '--dry-run', '--',
                          '--config.batch_size=4096', '--config.mesh.shape=(1,-1,1)'))
  parsed = subprocess.run([sys.executable, '-c', PARSE_TRAINER_FLAGS, *_train_args(ssh)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=_env(PYTHONPATH=str(REPO)))
  assert parsed.returncode == 0, parsed.stderr[-3000:]
  assert json.loads(parsed.stdout.splitlines()[-1]) == dict(
      workdir=WORKDIR, model='ViT-B/32', batch_size=4096, source='wds',
      pattern='gs://bucket/laion/{00000..00099}.tar', mesh=[1, -1, 1])


def test_logs_copy_out_and_delete():
  (log,) = _commands(_run(TPU / 'logs.sh', *ZONE_FLAGS, '--dry-run'))
  assert '--worker=0' in log and _flag(log, 'command').endswith('worker.sh log')
  (log_all,) = _commands(_run(TPU / 'logs.sh', *ZONE_FLAGS, '--worker=all', '--dry-run'))
  assert '--worker=all' in log_all
  (status,) = _commands(_run(TPU / 'logs.sh', *ZONE_FLAGS, '--status', '--dry-run'))
  assert '--worker=all' in status and _flag(status, 'command').endswith('worker.sh status')

  upload, mkdir, copy = _commands(_run(TPU / 'copy_out.sh', *ZONE_FLAGS, f'--workdir={WORKDIR}/',
                                       '--dest=/tmp/out', '--dry-run'))
  assert '--worker=all' in upload
  assert _flag(upload, 'command').endswith(f'worker.sh upload-log {WORKDIR}/logs')
  assert mkdir == ['mkdir', '-p', '/tmp/out']
  assert copy == ['gcloud', 'storage', 'cp', '--recursive', WORKDIR, '/tmp/out']

  (delete,) = _commands(_run(TPU / 'delete.sh', *ZONE_FLAGS, '--dry-run'))
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod'] and '--quiet' in delete
  (delete_qr,) = _commands(_run(TPU / 'delete.sh', *ZONE_FLAGS, '--queued', '--dry-run'))
  assert delete_qr[3:6] == ['queued-resources', 'delete', 'pod'] and '--force' in delete_qr


def test_watch_dry_run_shows_the_whole_bring_up():
  result = _run(TPU / 'watch.sh', *ZONE_FLAGS, '--queued', '--spot', f'--workdir={WORKDIR}',
                '--dry-run', '--', '--config.total_steps=10')
  cmds = _commands(result)
  steps = [' '.join(c[3:5]) for c in cmds if c[0] == 'gcloud']
  assert steps == ['queued-resources describe', 'queued-resources create', 'tpu-vm scp',
                   'tpu-vm ssh', 'tpu-vm ssh', 'tpu-vm ssh'], steps
  train = cmds[-2]
  assert _train_args(train)[-1] == '--config.total_steps=10'
  assert 'dry run: one pass shown' in result.stderr


def test_bad_settings_are_named():
  no_zone = _run(TPU / 'create.sh', '--dry-run', check=False)
  assert no_zone.returncode == 2 and 'TPU_ZONE' in no_zone.stderr
  local_workdir = _run(TPU / 'train.sh', *ZONE_FLAGS, '--workdir=/tmp/run', '--dry-run', check=False)
  assert local_workdir.returncode == 2 and 'gs://' in local_workdir.stderr
  unknown = _run(TPU / 'delete.sh', *ZONE_FLAGS, '--zonee=x', check=False)
  assert unknown.returncode == 2 and 'unknown flag --zonee=x' in unknown.stderr
  bad_type = _run(TPU / 'create.sh', *ZONE_FLAGS, '--accelerator-type=tpu9-8', '--dry-run', check=False)
  assert bad_type.returncode == 2 and '--runtime-version' in bad_type.stderr
  bad_env = _run(TPU / 'train.sh', *ZONE_FLAGS, f'--workdir={WORKDIR}', '--env=X', check=False)
  assert bad_env.returncode == 2 and "--env needs KEY=VALUE, got 'X'" in bad_env.stderr
  bad_spot = _run(TPU / 'create.sh', *ZONE_FLAGS, '--dry-run', env=_env(TPU_SPOT='yes'), check=False)
  assert bad_spot.returncode == 2 and 'TPU_SPOT' in bad_spot.stderr


# A stand-in for gcloud: records every call; `describe` answers the next TPU state and
# `worker.sh status` the next per-worker job states from the script file.
FAKE_GCLOUD = '''#!{python}
import json, sys
script_path, log_path = {script!r}, {log!r}
with open(log_path, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
script = json.load(open(script_path))
def pop(key):
  if not script[key]:
    sys.exit(f'fake gcloud: no more {{key}} answers')
  value = script[key].pop(0)
  json.dump(script, open(script_path, 'w'))
  return value
if 'describe' in sys.argv:
  print(pop('states'))
elif any(a.endswith('worker.sh status') for a in sys.argv):
  for i, job in enumerate(pop('jobs')):
    print(f'clip_jax_job pod-w-{{i}}: {{job}}')
'''


def _fake_gcloud(tmp_path, states, jobs):
  script, log = tmp_path / 'script.json', tmp_path / 'calls.jsonl'
  script.write_text(json.dumps({'states': states, 'jobs': jobs}))
  gcloud = tmp_path / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, script=str(script), log=str(log)))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = _env(GCLOUD=str(gcloud), WATCH_INTERVAL='0', WAIT_INTERVAL='0', TMPDIR=str(tmp_path))
  return env, log


def _calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()]


def _action(call):
  if call[:3] == ['storage', 'cp', '--recursive']:
    return 'copy'
  if call[3] == 'ssh':
    remote = _flag(call, 'command')
    return 'ssh ' + ('install' if 'pip install' in remote else remote.split()[2])
  return ' '.join(call[2:4])


def test_watch_recreates_after_preemption_and_restarts_a_crashed_job(tmp_path):
  # Running; then the slice is preempted; back up and running; a worker crashes; then done.
  env, log = _fake_gcloud(
      tmp_path,
      states=['READY', 'PREEMPTED', 'CREATING', 'READY', 'READY', 'READY'],
      jobs=[['running', 'running'], ['running', 'running'], ['exit 1', 'running'],
            ['exit 0', 'exit 0']])
  result = _run(TPU / 'watch.sh', *ZONE_FLAGS, '--spot', f'--workdir={WORKDIR}',
                '--delete-when-done', '--', '--config.total_steps=100', env=env)
  assert 'training finished' in result.stderr
  calls = _calls(log)
  assert [_action(c) for c in calls] == [
      'tpu-vm describe', 'ssh status',
      'tpu-vm describe', 'tpu-vm delete', 'tpu-vm create', 'tpu-vm scp', 'ssh install',
      'ssh start',
      'tpu-vm describe',                                  # CREATING: wait
      'tpu-vm describe', 'ssh status',                    # running
      'tpu-vm describe', 'ssh status', 'ssh stop', 'ssh start',   # a worker died: restart
      'tpu-vm describe', 'ssh status', 'tpu-vm delete']   # done, --delete-when-done
  create = calls[4]
  assert '--spot' in create and _flag(create, 'accelerator-type') == 'v4-8'
  starts = [c for c in calls if _action(c) == 'ssh start']
  assert all('--worker=all' in c for c in starts)
  # The same training command every time, so each restart resumes from --workdir.
  assert _train_args(starts[0]) == _train_args(starts[1]) == [
      '--config=configs/vit_b32.py', f'--workdir={WORKDIR}', '--config.total_steps=100']


def test_watch_queued_resource_suspended_and_gives_up(tmp_path):
  env, log = _fake_gcloud(tmp_path, states=['SUSPENDED', 'ACCEPTED', 'ACTIVE', 'ACTIVE'],
                          jobs=[['exit 2']])
  env['WATCH_MAX_RESTARTS'] = '1'
  result = _run(TPU / 'watch.sh', *ZONE_FLAGS, '--queued', f'--workdir={WORKDIR}', env=env,
                check=False)
  assert result.returncode == 2 and 'gave up after 2 restarts' in result.stderr
  actions = [_action(c) for c in _calls(log)]
  assert actions == ['queued-resources describe', 'queued-resources delete',
                     'queued-resources create',
                     'queued-resources describe', 'queued-resources describe',   # wait for ACTIVE
                     'tpu-vm scp', 'ssh install', 'ssh start',
                     'queued-resources describe', 'ssh status', 'ssh stop', 'ssh start']


def _metadata(directory, worker_id, endpoints):
  directory.mkdir()
  (directory / 'agent-worker-number').write_text(str(worker_id))
  (directory / 'worker-network-endpoints').write_text(endpoints)
  return f'file://{directory}'


# gcloud whose `tpu-vm ssh --worker=all --command=CMD` runs CMD for real on two local
# "workers", each with its own home (where ~/clip_jax is this checkout) and TPU metadata.
FAKE_SSH_GCLOUD = '''#!{python}
import os, subprocess, sys
root = {root!r}
command = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--command='))
for worker in (0, 1):
  home = os.path.join(root, f'worker{{worker}}')
  env = dict(os.environ, HOME=home, TPU_METADATA_URL='file://' + os.path.join(home, 'metadata'),
             CLIP_JAX_VENV=os.path.join(root, 'venv'))
  subprocess.run(['bash', '-c', command], env=env, check=True)
'''

# The workers' "python": records its arguments, then shows the workdir the trainer would
# use, resolved by clip_jax's path layer from the worker's own directory.
RESOLVE_WORKDIR = (
    "import sys; from clip_jax import storage; "
    "w = [a for a in sys.argv[1:] if a.startswith('--workdir=')][0].split('=', 1)[1]; "
    "print('trainer workdir:', storage.resolve(w))")


def test_train_passes_the_gs_workdir_unchanged_to_every_worker(tmp_path):
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  fake_python = venv / 'bin' / 'python'
  fake_python.write_text(f'#!/usr/bin/env bash\necho "args: $*"\n'
                         f'exec {sys.executable} -c {shlex.quote(RESOLVE_WORKDIR)} "$@"\n')
  fake_python.chmod(0o755)
  (venv / 'bin' / 'activate').write_text(f'export PATH={venv}/bin:$PATH\n')
  for worker in (0, 1):
    home = tmp_path / f'worker{worker}'
    home.mkdir()
    (home / 'clip_jax').symlink_to(REPO)
    _metadata(home / 'metadata', worker, 't1v-n-0-w-0:0:10.0.0.2,t1v-n-0-w-1:1:10.0.0.3')
  gcloud = tmp_path / 'gcloud'
  gcloud.write_text(FAKE_SSH_GCLOUD.format(python=sys.executable, root=str(tmp_path)))
  gcloud.chmod(0o755)
  _run(TPU / 'train.sh', *ZONE_FLAGS, f'--workdir={WORKDIR}',
       '--data=gs://bucket/laion/{00000..00099}.tar', env=_env(GCLOUD=str(gcloud)))
  for worker in (0, 1):
    log_file, deadline = tmp_path / f'worker{worker}' / 'clip_jax_job' / 'log', time.time() + 60
    while 'exit 0' not in (log_file.read_text() if log_file.exists() else ''):
      assert time.time() < deadline, log_file.read_text() if log_file.exists() else 'no log'
      time.sleep(0.1)
    log = log_file.read_text()
    assert (f'args: -m clip_jax.main --config=configs/vit_b32.py --workdir={WORKDIR} '
            '--config.data.train.source=wds') in log
    assert f'trainer workdir: {WORKDIR}\n' in log
    assert f'process {worker} of 2, coordinator 10.0.0.2:8476' in log


def test_worker_job_control_for_real(tmp_path):
  """worker.sh on this machine: start detaches the job with the distributed environment
  of its TPU worker, status follows it, stop ends it."""
  venv, home = tmp_path / 'venv', tmp_path / 'home'
  (venv / 'bin').mkdir(parents=True)
  # The job's "python": records its arguments and environment, then waits for a file
  # and exits with the code written in it; on SIGTERM it "saves" and exits 0, as the trainer.
  fake_python = venv / 'bin' / 'python'
  fake_python.write_text('#!/usr/bin/env bash\ntrap "echo saved; exit 0" TERM\necho "args: $*"\nenv | grep -E ^CLIP_JAX_\(COORDINATOR_ADDRESS\|NUM_PROCESSES\|PROCESS_ID\)= | sort\n'
                         f'while [[ ! -f {tmp_path}/release ]]; do sleep 0.1; done\n'
                         f'exit "$(cat {tmp_path}/release)"\n')
  fake_python.chmod(0o755)
  (venv / 'bin' / 'activate').write_text(f'export PATH={venv}/bin:$PATH\n')
  env = _env(CLIP_JAX_VENV=str(venv), CLIP_JAX_JOB_DIR=str(home / 'job'),
             TPU_METADATA_URL=_metadata(tmp_path / 'md1', 1,
                                        't1v-n-0-w-0:0:10.0.0.2,t1v-n-0-w-1:1:10.0.0.3'))
  worker = TPU / 'worker.sh'

  def status():
    return _run(worker, 'status', env=env).stdout.split(': ', 1)[1].strip()

  def wait_for(expected):
    deadline = time.time() + 20
    while status() != expected and time.time() < deadline:
      time.sleep(0.1)
    assert status() == expected

  assert status() == 'absent'
  assert 'started pid' in _run(worker, 'start', '--', '--config=configs/tiny.py', 'a b', env=env).stdout
  wait_for('running')
  (tmp_path / 'release').write_text('3')
  wait_for('exit 3')
  log = (home / 'job' / 'log').read_text()
  assert 'args: -m clip_jax.main --config=configs/tiny.py a b' in log and 'exit 3' in log
  assert ('CLIP_JAX_COORDINATOR_ADDRESS=10.0.0.2:8476\nCLIP_JAX_NUM_PROCESSES=2\n'
          'CLIP_JAX_PROCESS_ID=1\n') in log

  # Hostname-style endpoints. A stopped job (SIGTERM: the trainer saves and exits 0)
  # is recorded as 143, which watch.sh restarts rather than taking it for finished.
  (tmp_path / 'release').unlink()
  env['TPU_METADATA_URL'] = _metadata(tmp_path / 'md2', 0, 'host-a,host-b,host-c,host-d')
  _run(worker, 'start', '--', '--config=configs/tiny.py', env=env)
  wait_for('running')
  log_file, deadline = home / 'job' / 'log', time.time() + 20
  while 'CLIP_JAX_PROCESS_ID' not in log_file.read_text() and time.time() < deadline:
    time.sleep(0.1)
  pid = int((home / 'job' / 'pid').read_text())
  assert 'stopped' in _run(worker, 'stop', env=env).stdout
  assert status() == 'exit 143'
  assert 'saved' in log_file.read_text()
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  log = log_file.read_text()
  assert ('CLIP_JAX_COORDINATOR_ADDRESS=host-a:8476\nCLIP_JAX_NUM_PROCESSES=4\n'
          'CLIP_JAX_PROCESS_ID=0\n') in log


# --- GPU ---------------------------------------------------------------------------

def _launch_env(result):
  lines = result.stdout.splitlines()
  env = dict(line.split('=', 1) for line in lines[:-1])
  return env, shlex.split(lines[-1])


def test_gpu_launcher_explicit_flags_and_env():
  result = _run(GPU / 'launch.sh', '--coordinator=10.0.0.1:1234', '--num-processes=4',
                '--process-id=3', '--local-device-ids=0,1', '--python=/opt/py', '--dry-run',
                '--', '--config=configs/vit_b32.py', '--workdir=/shared/run')
  env, command = _launch_env(result)
  assert env == {'CLIP_JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'CLIP_JAX_NUM_PROCESSES': '4',
                 'CLIP_JAX_PROCESS_ID': '3', 'JAX_LOCAL_DEVICE_IDS': '0,1'}
  assert command == ['/opt/py', '-m', 'clip_jax.main', '--config=configs/vit_b32.py',
                     '--workdir=/shared/run']
  # The same values from the environment.
  from_env = _run(GPU / 'launch.sh', '--dry-run', '--', '--config=x', env=_env(
      CLIP_JAX_COORDINATOR_ADDRESS='10.0.0.1:1234', CLIP_JAX_NUM_PROCESSES='4',
      CLIP_JAX_PROCESS_ID='2'))
  env, _ = _launch_env(from_env)
  assert env['CLIP_JAX_PROCESS_ID'] == '2' and env['CLIP_JAX_NUM_PROCESSES'] == '4'


def test_gpu_launcher_under_slurm_every_task_joins_one_coordinator():
  """srun runs the same launch.sh on every task; each derives its own id, all one coordinator."""
  sbatch = _run(GPU / 'slurm.sbatch', '--dry-run', '--config=configs/vit_b32.py',
                '--workdir=/shared/run', env=_env(SLURM_SUBMIT_DIR=str(REPO)))
  srun = shlex.split(sbatch.stdout.strip())
  assert srun[0] == 'srun' and '--kill-on-bad-exit=1' in srun
  launch_at = srun.index('bash') + 1
  assert srun[launch_at] == 'launch/gpu/launch.sh'
  task_args = srun[launch_at + 1:]
  assert task_args == ['--', '--config=configs/vit_b32.py', '--workdir=/shared/run']

  seen = []
  for procid in range(3):
    slurm = _env(SLURM_JOB_ID='4242', SLURM_NTASKS='3', SLURM_PROCID=str(procid),
                 SLURM_JOB_NODELIST='gpu-[007-009],login1', PATH='/usr/bin:/bin')
    env, command = _launch_env(_run(REPO / srun[launch_at], '--dry-run', *task_args, env=slurm))
    seen.append(env)
    assert command == ['python', '-m', 'clip_jax.main', '--config=configs/vit_b32.py',
                       '--workdir=/shared/run']
  assert [e['CLIP_JAX_PROCESS_ID'] for e in seen] == ['0', '1', '2']
  assert {e['CLIP_JAX_COORDINATOR_ADDRESS'] for e in seen} == {f'gpu-007:{10000 + 4242}'}
  assert {e['CLIP_JAX_NUM_PROCESSES'] for e in seen} == {'3'}


@pytest.mark.parametrize('args,message', [
    (['--num-processes=2', '--process-id=0'], 'no coordinator'),
    (['--coordinator=host', '--num-processes=2', '--process-id=0'], 'expected HOST:PORT'),
    (['--coordinator=h:1', '--num-processes=0', '--process-id=0'], '--num-processes'),
    (['--coordinator=h:1', '--num-processes=2', '--process-id=2'], 'expected 0..1'),
    (['--coordinator=h:1', '--num-processes=2', '--process-id=0', '--local-device-ids=a'],
     '--local-device-ids'),
    (['--config=x'], 'trainer flags go after --'),
])
def test_gpu_launcher_rejects_bad_settings(args, message):
  result = _run(GPU / 'launch.sh', '--dry-run', *args, check=False)
  assert result.returncode == 2 and message in result.stderr, result.stderr
