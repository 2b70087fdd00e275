"""Runs on gs:// against a real GCS protocol server on 127.0.0.1 (tests/gcs_emulator.py).

Every clip_jax step runs as the user runs it, `python -m ...` in a fresh directory with
the emulator's settings in the environment; the test checks the bucket with plain HTTP:
- the tiny default trains to the end with `--workdir=gs://BUCKET/run`: config.json,
  checkpoints, metrics.jsonl, TensorBoard events and eval results are in the bucket and
  nothing is written under the current directory;
- kill -9 mid-run, the same command again: it resumes from the bucket, and every step's
  loss equals the uninterrupted run's;
- evaluate, export (openai and hf), embed and clip_jax.load on gs://BUCKET/run;
- TFRecord and webdataset shards on the bucket give exactly the batches of local copies
  (brace ranges, globs, two hosts, exact resume);
- a planted fault on a training shard (through FaultyProxy) is retried and recovered
  from with the same losses and skipped count as a clean run; a fault for good stops
  the run with an error naming the file and the byte offset, and the last checkpoint
  stays the one to resume from.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from gcs_emulator import FaultyProxy, GcsEmulator, run

pytestmark = pytest.mark.slow

# Size settings only: the run is the default one, shorter, with every step logged.
SIZE = ['--config.total_steps=40', '--config.log.every_steps=1',
        '--config.checkpoint.every_steps=10']


@pytest.fixture(scope='module')
def gcs():
  with GcsEmulator() as emulator:
    yield emulator


@pytest.fixture(scope='module')
def trained(gcs, tmp_path_factory):
  """`python -m clip_jax.main --workdir=gs://BUCKET/run` (the tiny default) from a fresh cwd."""
  cwd = tmp_path_factory.mktemp('fresh_cwd')
  result = run(['-m', 'clip_jax.main', f'--workdir=gs://{gcs.bucket}/run', *SIZE],
               gcs.env(), str(cwd))
  return dict(cwd=cwd, stdout=result.stdout, stderr=result.stderr)


def losses(gcs, workdir):
  """step -> loss from metrics.jsonl in the bucket (a resumed run's later lines win)."""
  history = {}
  for line in gcs.download(f'{workdir}/metrics.jsonl').decode().splitlines():
    record = json.loads(line)
    if 'loss' in record:
      history[record['step']] = record
  return history


def test_the_default_run_lives_in_the_bucket(gcs, trained):
  assert f'workdir: gs://{gcs.bucket}/run\n' in trained['stdout']
  assert re.search(r'zero-shot top-1 on held-out: [\d.]+% \(chance 2\.8%\)', trained['stdout'])
  names = gcs.list_objects('run/')
  assert 'run/config.json' in names and 'run/eval_results.json' in names
  assert 'run/eval_results.jsonl' in names and 'run/builtin_data/tokenizer.model' in names
  assert len([n for n in names if n.startswith('run/builtin_data/shards/')]) == 8
  steps = {int(n.split('/')[2]) for n in names if n.startswith('run/checkpoints/')}
  assert steps == {20, 30, 40}   # every 10 steps, the last 3 kept
  assert sorted(losses(gcs, 'run')) == list(range(1, 41))
  assert json.loads(gcs.download('run/config.json'))['total_steps'] == 40
  results = json.loads(gcs.download('run/eval_results.json'))
  assert results['step'] == 40 and 'zeroshot/builtin_test/top1' in results['metrics']

  # TensorBoard's events, read back by TensorFlow: every logged step's loss.
  import tensorflow as tf
  (events_name,) = [n for n in names if n.startswith('run/tensorboard/events.out.tfevents.')]
  local = trained['cwd'].parent / 'events.tfevents'
  local.write_bytes(gcs.download(events_name))
  events = [tf.compat.v1.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(local))]
  logged = {e.step for e in events for v in e.summary.value if v.tag == 'loss'}
  assert logged == set(range(1, 41))
  local.unlink()

  # Nothing landed in the directory the command ran from.
  assert list(trained['cwd'].iterdir()) == []


def test_kill_9_then_the_same_command_resumes_from_the_bucket(gcs, trained, tmp_path):
  workdir = f'gs://{gcs.bucket}/killed'
  # The built-in data of the first run (the same scenes): only the run itself is new.
  command = [sys.executable, '-m', 'clip_jax.main', f'--workdir={workdir}', *SIZE,
             f'--config.builtin.dir=gs://{gcs.bucket}/run/builtin_data']
  process = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, **gcs.env()),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while 'killed/checkpoints/10/commit_success.txt' not in gcs.list_objects('killed/checkpoints/'):
      assert process.poll() is None and time.time() < deadline, 'no checkpoint 10 in time'
      time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
  interrupted = max(losses(gcs, 'killed'))
  assert 10 <= interrupted < 40, interrupted

  again = run(command[1:], gcs.env(), str(tmp_path))
  assert re.search(r'resumed from step (10|20|30) ', again.stdout), again.stdout
  resumed, reference = losses(gcs, 'killed'), losses(gcs, 'run')
  assert sorted(resumed) == list(range(1, 41))
  np.testing.assert_allclose([resumed[s]['loss'] for s in range(1, 41)],
                             [reference[s]['loss'] for s in range(1, 41)], atol=1e-5)


LOAD_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'load_check.py')


def test_evaluate_export_embed_and_load_on_the_bucket(gcs, trained, tmp_path):
  env, bucket = gcs.env(), gcs.bucket
  before = json.loads(gcs.download('run/eval_results.json'))
  evaluated = run(['-m', 'clip_jax.evaluate', f'--workdir=gs://{bucket}/run',
                   '--task=zeroshot', '--dataset=builtin'], env, str(tmp_path))
  assert f'written to gs://{bucket}/run/eval_results.json' in evaluated.stdout
  after = json.loads(gcs.download('run/eval_results.json'))
  assert after['time'] > before['time']
  assert after['metrics']['zeroshot/builtin_test/top1'] == pytest.approx(
      before['metrics']['zeroshot/builtin_test/top1'])
  assert len(gcs.download('run/eval_results.jsonl').decode().splitlines()) == 2

  run(['-m', 'clip_jax.convert', 'export', '--workdir', f'gs://{bucket}/run', '--format',
       'openai', '--out', f'gs://{bucket}/export/m.safetensors'], env, str(tmp_path))
  run(['-m', 'clip_jax.convert', 'export', '--workdir', f'gs://{bucket}/run', '--format', 'hf',
       '--out', f'gs://{bucket}/export/hf'], env, str(tmp_path))
  assert set(gcs.list_objects('export/')) == {
      'export/m.safetensors', 'export/open_clip_config.json', 'export/hf/model.safetensors',
      'export/hf/config.json'}

  gcs.upload('texts/captions.txt', b'a red circle\na small blue square on the left\n')
  embedded = run(['-m', 'clip_jax.embed', f'--workdir=gs://{bucket}/run',
                  f'--texts=gs://{bucket}/texts/captions.txt',
                  f'--out=gs://{bucket}/texts/embeddings.npy'], env, str(tmp_path))
  assert f'-> gs://{bucket}/texts/embeddings.npy' in embedded.stdout
  embeddings = np.load(io.BytesIO(gcs.download('texts/embeddings.npy')))
  assert embeddings.shape == (2, 64)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
  assert gcs.download('texts/embeddings.txt').decode().splitlines()[0] == 'a red circle'

  loaded = run([LOAD_CHECK, f'gs://{bucket}/run/builtin_data/tokenizer.model',
                f'gs://{bucket}/run', f'hf=gs://{bucket}/export/hf',
                f'openai=gs://{bucket}/export/m.safetensors'], env, str(tmp_path))
  assert loaded.stdout.splitlines()[-2:] == [
      f'same image and text features: gs://{bucket}/export/hf',
      f'same parameters: gs://{bucket}/export/m.safetensors']
  assert list(tmp_path.iterdir()) == []


# --- training shards in the bucket --------------------------------------------------------

def _noise_png(rng, size=64):
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, 'PNG')
  return buffer.getvalue()


def _tar(path, rng, count, start):
  with tarfile.open(path, 'w') as tar:
    for i in range(start, start + count):
      for extension, data in (('png', _noise_png(rng, 32)), ('txt', f'a red circle {i}'.encode())):
        info = tarfile.TarInfo(f'{i:06d}.{extension}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


COMPARE_STREAMS = """
import json, sys
import numpy as np
from clip_jax.config import get_config
from clip_jax.data.pipeline import make_train_iterator
from clip_jax.data.tokenizers import SentencePieceTokenizer
bucket, local = sys.argv[1], sys.argv[2]
remote = f'gs://{bucket}/streams'
tokenizer = SentencePieceTokenizer(f'gs://{bucket}/run/builtin_data/tokenizer.model', 16)
kinds = {'tfrecord': ('records/shard-{{00000..00003}}-of-00004.tfrecord', 'records/*.tfrecord'),
         'wds': ('tars/{{000..003}}.tar', 'tars/*.tar')}
report = {}
for kind, (ranged, globbed) in kinds.items():
  # The local copy by range, the bucket's by range and by glob; two hosts each.
  streams = {}
  for variant, pattern in (('local', f'{local}/{ranged}'), ('ranged', f'{remote}/{ranged}'),
                           ('globbed', f'{remote}/{globbed}')):
    config = get_config('tiny')
    config.batch_size, config.seed = 16, 3
    config.data.train.source, config.data.train.pattern = kind, pattern.format()
    config.data.shuffle_buffer, config.data.cycle_length = 20, 2
    for host in (0, 1):
      iterator = make_train_iterator(config, tokenizer, process_index=host, process_count=2)
      first = next(iterator)
      position = iterator.state_dict()
      rest = [next(iterator) for _ in range(2)]
      resumed = make_train_iterator(config, tokenizer, process_index=host, process_count=2,
                                    state=position)
      again = [next(resumed) for _ in range(2)]
      iterator.close()
      resumed.close()
      exact = all(np.array_equal(a[k], b[k]) for a, b in zip(rest, again) for k in a)
      del position['fingerprint']   # it names the files, which differ
      streams[variant, host] = ([first] + rest, exact, position)
  same = lambda x, y: all(np.array_equal(a[k], b[k]) for a, b in zip(x, y) for k in a)
  report[kind] = dict(
      resume_exact=all(exact for _, exact, _ in streams.values()),
      same_as_local=all(same(batches, streams['local', host][0])
                        for (_, host), (batches, _, _) in streams.items()),
      hosts_differ=not same(streams['ranged', 0][0], streams['ranged', 1][0]),
      positions_equal=all(position == streams['local', host][2]
                          for (_, host), (_, _, position) in streams.items()))
print(json.dumps(report))
"""


def test_shards_on_the_bucket_read_exactly_like_local_ones(gcs, trained, tmp_path):
  from clip_jax.data.shards import write_tfrecord_shards
  rng = np.random.default_rng(0)
  local = tmp_path / 'local'
  write_tfrecord_shards(({'image': _noise_png(rng, 32), 'caption': [f'a blue star {i}']}
                         for i in range(96)), str(local / 'records'), 4)
  (local / 'tars').mkdir()
  for shard in range(4):
    _tar(local / 'tars' / f'{shard:03d}.tar', rng, 24, 24 * shard)
  for path in sorted(p for p in local.rglob('*') if p.is_file()):
    gcs.upload(f'streams/{path.relative_to(local)}', path.read_bytes())
  result = run(['-c', COMPARE_STREAMS, gcs.bucket, str(local)], gcs.env(), str(tmp_path))
  report = json.loads(result.stdout.splitlines()[-1])
  for kind in ('tfrecord', 'wds'):
    assert report[kind] == dict(resume_exact=True, same_as_local=True, hosts_differ=True,
                                positions_equal=True), (kind, report)


# Own shards for the fault tests: 2 shards of ~9.9 MB, so that each is read in two 8 MiB
# requests and a fault can strike in the middle of a file; a few corrupt images in them.
FAULT_DATA = 'faulty/shards'
NUM_CORRUPT = 6


@pytest.fixture(scope='module')
def fault_shards(gcs, tmp_path_factory):
  from clip_jax.data.shards import write_tfrecord_shards
  rng = np.random.default_rng(1)
  folder = tmp_path_factory.mktemp('fault_shards')
  corrupt = set(rng.choice(1600, NUM_CORRUPT, replace=False).tolist())
  records = ({'image': b'not an image' if i in corrupt else _noise_png(rng),
              'caption': ['a red circle', 'a green square', 'a blue star'][i % 3]}
             for i in range(1600))
  paths = write_tfrecord_shards(records, str(folder), 2)
  for path in paths:
    gcs.upload(f'{FAULT_DATA}/{os.path.basename(path)}', open(path, 'rb').read())
  assert all(os.path.getsize(p) > 9 * 2**20 for p in paths)
  return [f'{FAULT_DATA}/{os.path.basename(p)}' for p in paths]


def own_data(gcs, workdir, steps, *extra):
  return ['-m', 'clip_jax.main', *extra, f'--workdir=gs://{gcs.bucket}/{workdir}',
          '--config.builtin.enabled=False', '--config.eval.zeroshot=', '--config.eval.retrieval=',
          f'--config.data.train.pattern=gs://{gcs.bucket}/{FAULT_DATA}/*.tfrecord',
          f'--config.data.tokenizer.model_path=gs://{gcs.bucket}/run/builtin_data/tokenizer.model',
          '--config.batch_size=64', f'--config.total_steps={steps}', '--config.log.every_steps=1',
          '--config.checkpoint.every_steps=4', '--config.data.read_attempts=4',
          '--config.data.read_retry_seconds=0.2']


def test_storage_faults_are_retried_then_named_and_never_counted_as_bad_data(
    gcs, trained, fault_shards, tmp_path):
  with FaultyProxy(gcs.url) as proxy:
    env = gcs.env(endpoint=proxy.url)
    # The reference run, profiled on the way (the trace is made locally, then uploaded).
    run(own_data(gcs, 'clean', 12, '--config.log.profile_steps=(2,3)'), env, str(tmp_path))
    clean = losses(gcs, 'clean')
    assert clean[12]['data/skipped'] > 0   # the corrupt images, skipped and counted
    assert any(n.endswith('.xplane.pb') for n in gcs.list_objects('clean/profile/'))

    # For a while: reading the second shard past its first 8 MiB fails twice with 503
    # (gcsfs retries those itself), then twice with 404, as if the object had vanished
    # (our reader retries from its byte offset). The run recovers and sees the same data.
    second = fault_shards[1]
    proxy.fail(second, (503, 503, 404, 404), from_byte=8 << 20)
    recovered = run(own_data(gcs, 'recovered', 12), env, str(tmp_path))
    assert proxy.injected == [(second, 503), (second, 503), (second, 404), (second, 404)]
    retried = [line for line in recovered.stderr.splitlines() if 'storage.py' in line]
    assert len(retried) == 2 and all(
        f'gs://{gcs.bucket}/{second}: reading 8388608 bytes at byte 8388608 failed' in line
        for line in retried), recovered.stderr[-5000:]
    again = losses(gcs, 'recovered')
    assert [again[s]['data/skipped'] for s in range(1, 13)] == [
        clean[s]['data/skipped'] for s in range(1, 13)]
    np.testing.assert_allclose([again[s]['loss'] for s in range(1, 13)],
                               [clean[s]['loss'] for s in range(1, 13)], atol=1e-5)

    # For good: going on to step 16 stops with an error that names the object and the
    # offset; the checkpoints and metrics of the run are untouched.
    proxy.injected.clear()
    proxy.fail(second, forever=404, from_byte=8 << 20)
    before = gcs.list_objects('recovered/checkpoints/')
    failed = run(own_data(gcs, 'recovered', 16), env, str(tmp_path), check=False)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert 'resumed from step 12 ' in failed.stdout
    assert re.search(rf'error: gs://{gcs.bucket}/{second}: reading \d+ bytes at byte 8388608 '
                     r'failed 4 time\(s\), last with FileNotFoundError', failed.stderr), (
                         failed.stderr[-3000:])
    # Every reader of that shard (the run reads ahead into the next epoch) tried 4 times.
    assert len(proxy.injected) >= 4 and set(proxy.injected) == {(second, 404)}
    assert losses(gcs, 'recovered') == again
    assert gcs.list_objects('recovered/checkpoints/') == before
    assert 'recovered/checkpoints/12/commit_success.txt' in before
