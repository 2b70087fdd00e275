"""The DataComp suite: its task list as DataComp states it, its metrics against
clip_benchmark's and sklearn's own code, and `python -m clip_jax.evaluate --suite=datacomp`
on a data root laid out as DataComp's download script lays it out (some tasks present,
some missing): the table, the group means, the results file in DataComp's format, resume
after an interruption, the classifier cache, bfloat16, two hosts, and gs://."""

import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate import suite as suite_lib
from clip_jax.evaluate.datasets import open_dataset
from clip_jax.evaluate.loading import load_for_evaluation
from clip_jax.evaluate.run import image_features
from clip_jax.sharding import make_mesh
from gcs_emulator import GcsEmulator, run
from localhost_workers import REPO, run_two_workers
from test_clip_benchmark_parity import legacy_float
from test_wds_eval import (CLASSNAMES, TEMPLATES, classification_samples, retrieval_samples,
                           small_clip_workdir, write_wds)

DATACOMP = suite_lib.load_suite('datacomp')
# The tasks laid out under the data root: one of each kind of main metric.
PRESENT = ('imagenet1k', 'vtab/pets', 'wilds/iwildcam', 'wilds/fmow', 'fairness/dollar_street',
           'retrieval/flickr_1k_test_image_text_retrieval')
BATCH = ['--batch_size', '16']


def task(key):
  return next(t for t in DATACOMP.tasks if t.key == key)


def test_the_task_list_is_datacomps():
  names = [t.name for t in DATACOMP.tasks]
  assert len(DATACOMP.tasks) == 38 == len(set(names)) == len({t.key for t in DATACOMP.tasks})
  assert 'mlfoundations/datacomp' in DATACOMP.source and 'tasklist.yml' in DATACOMP.source
  assert {g: len(n) for g, n in DATACOMP.groups.items()} == {
      'ImageNet': 1, 'ImageNet dist. shifts': 6, 'VTAB': 13, 'Retrieval': 3}
  assert all(n in names for group in DATACOMP.groups.values() for n in group)
  mains = {t.name: t.main_metric for t in DATACOMP.tasks if t.main_metric != 'acc1'}
  assert mains == {
      'Caltech-101': 'mean_per_class_recall', 'FGVC Aircraft': 'mean_per_class_recall',
      'Oxford Flowers-102': 'mean_per_class_recall', 'Oxford-IIIT Pet': 'mean_per_class_recall',
      'Flickr': 'mean_recall@1', 'MSCOCO': 'mean_recall@1', 'WinoGAViL': 'jaccard_score_10-12',
      'iWildCam': 'F1-macro_all', 'FMoW': 'acc_worst_region', 'Dollar Street': 'acc_top5_wg',
      'GeoDE': 'acc_wg'}
  # eval_utils/wds_eval.py's folder rule (download_evalsets.py drops 'fairness/').
  for t in DATACOMP.tasks:
    assert t.folder == f'wds_{t.key.removeprefix("fairness/").replace("/", "-")}_test'
  assert [t.name for t in DATACOMP.tasks if t.unsupported] == ['WinoGAViL']
  assert task('imagenet1k').size == 50000 and task('vtab/pets').num_classes == 37
  # The file ships with the package.
  with open(f'{REPO}/setup.py') as f:
    setup = f.read()
  assert re.search(r"package_data=\{'clip_jax\.evaluate': \['datacomp_tasks\.json'\]\}", setup)


def test_classification_metrics_are_clip_benchmarks_and_wilds(monkeypatch):
  from clip_benchmark.metrics import zeroshot_classification as zsc
  monkeypatch.setattr(zsc, 'float', legacy_float, raising=False)   # numpy 2.4 (see there)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 12)).astype(np.float32)
  labels = rng.integers(0, 12, 300)
  labels[labels == 7] = 8            # a class nobody is: left out of the per-class mean
  ours = suite_lib.classification_task_metrics(task('cifar10'), logits, labels)
  acc1, acc5 = zsc.accuracy(torch.from_numpy(logits), torch.from_numpy(labels), topk=(1, 5))
  assert ours['acc1'] == pytest.approx(acc1) and ours['acc5'] == pytest.approx(acc5)
  assert ours['mean_per_class_recall'] == pytest.approx(
      balanced_accuracy_score(labels, logits.argmax(1)))
  assert suite_lib.classification_task_metrics(task('vtab/pcam'), logits[:, :2],
                                               labels % 2)['acc5'] is None   # < 5 classes
  f1 = suite_lib.classification_task_metrics(task('wilds/iwildcam'), logits, labels)
  assert f1['F1-macro_all'] == pytest.approx(
      f1_score(labels, logits.argmax(1), average='macro', labels=np.unique(labels)))
  # Worst group as WILDS computes it: groups 0..max, the empty ones (here 1) not candidates.
  regions = rng.choice([0, 2, 3], 300)
  metadata = [np.array([r, 2016, y]) for r, y in zip(regions, labels)]
  fmow = suite_lib.classification_task_metrics(task('wilds/fmow'), logits, labels, metadata)
  hits = logits.argmax(1) == labels
  worst = min(hits[regions == r].mean() for r in (0, 2, 3))
  assert fmow['acc_worst_region'] == pytest.approx(worst)
  street = suite_lib.classification_task_metrics(task('fairness/dollar_street'), logits, labels,
                                                 [np.array([r, 0, 0]) for r in regions])
  top5 = np.any(np.argsort(-logits, 1)[:, :5] == labels[:, None], 1)
  assert street['acc_top5_wg'] == pytest.approx(min(top5[regions == r].mean() for r in (0, 2, 3)))
  with pytest.raises(ValueError, match=r"FMoW: acc_worst_region needs every sample's \.npy"):
    suite_lib.classification_task_metrics(task('wilds/fmow'), logits, labels, None)


def test_retrieval_metrics_are_clip_benchmarks():
  from clip_benchmark.metrics import zeroshot_retrieval as zsr
  rng = np.random.default_rng(1)
  images = rng.normal(size=(40, 16)).astype(np.float32)
  owners = np.repeat(np.arange(40), rng.integers(1, 6, 40))
  texts = images[owners] + rng.normal(scale=2.0, size=(len(owners), 16)).astype(np.float32)
  ours = suite_lib.retrieval_task_metrics(images, texts, owners)
  normalize = lambda x: torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
  scores = normalize(texts) @ normalize(images).T
  positive = torch.zeros_like(scores, dtype=torch.bool)
  positive[torch.arange(len(owners)), torch.from_numpy(owners)] = True
  for k in (1, 5, 10):
    theirs_image = (zsr.batchify(zsr.recall_at_k, scores, positive, 8, 'cpu', k=k) > 0)
    theirs_text = (zsr.batchify(zsr.recall_at_k, scores.T, positive.T, 8, 'cpu', k=k) > 0)
    assert ours[f'image_retrieval_recall@{k}'] == pytest.approx(theirs_image.float().mean().item())
    assert ours[f'text_retrieval_recall@{k}'] == pytest.approx(theirs_text.float().mean().item())
  assert 0 < ours['mean_recall@1'] < 1
  assert ours['mean_recall@1'] == pytest.approx(
      (ours['image_retrieval_recall@1'] + ours['text_retrieval_recall@1']) / 2)


def metadata_samples(fields: int, seed: int) -> list[dict]:
  """Classification samples with a `.npy` metadata vector (group in field 0, 3 groups)."""
  samples = classification_samples(2, seed=seed)
  for i, sample in enumerate(samples):
    sample['npy'] = np.array([i % 3] + [0] * (fields - 1), np.int64)
  return samples


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """A data root with six of DataComp's tasks, in their folders and layout."""
  base = tmp_path_factory.mktemp('datacomp')
  for seed, key in enumerate(PRESENT):
    folder = base / task(key).folder
    if key.startswith('retrieval/'):
      write_wds(folder, retrieval_samples(12, seed=seed), per_shard=7, dataset_type='retrieval')
    else:
      samples = (metadata_samples(len(task(key).metadata_fields), seed)
                 if task(key).worst_group else classification_samples(2, seed=seed))
      # Three template sets among the five classification tasks (classifiers cached per set).
      write_wds(folder, samples, per_shard=9, classnames=CLASSNAMES,
                templates=TEMPLATES[:1 + seed % 3])
  return base


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp('model') / 'run'
  small_clip_workdir(path)
  return path


def suite(workdir, root, out, *extra):
  return evaluate_cli.main(['--workdir', str(workdir), '--suite', 'datacomp', '--data_root',
                            str(root), '--out', str(out), *BATCH, *extra])


def lines(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_suite_table_results_file_resume_and_cache(workdir, root, tmp_path, capsys, monkeypatch):
  out = tmp_path / 'out'
  calls, die_at = [], [3]
  evaluate = suite_lib.evaluate_task

  def interrupted(task, *args, **kwargs):
    calls.append(task.key)
    if len(calls) == die_at[0]:
      die_at[0] = 0
      raise RuntimeError('stopped')   # the first run dies during its third task
    return evaluate(task, *args, **kwargs)

  monkeypatch.setattr(suite_lib, 'evaluate_task', interrupted)
  with pytest.raises(RuntimeError, match='stopped'):
    suite(workdir, root, out)
  path = out / 'datacomp_results.jsonl'
  assert [r['key'] for r in lines(path)] == [t.key for t in DATACOMP.tasks if t.key in PRESENT][:2]
  printed = capsys.readouterr().out
  assert 'datacomp: 6 of 38 tasks under' in printed
  assert 'missing: wds_vtab-caltech101_test' in printed
  assert 'WinoGAViL (misc/winogavil): not expressible here: DataComp reads it' in printed

  calls.clear()
  results = suite(workdir, root, out)
  assert sorted(calls) == sorted(set(PRESENT) - {r['key'] for r in lines(path)[:2]})  # resumed
  records = {r['key']: r for r in lines(path)}
  assert sorted(records) == sorted(PRESENT) and len(lines(path)) == 6
  printed = capsys.readouterr().out
  for key in PRESENT:           # DataComp's line format; main metric as the task says
    record = records[key]
    assert record['dataset'] == task(key).name and record['model'] and record['max_examples'] == 0
    metrics = record['metrics']
    assert metrics['main_metric'] == metrics[task(key).main_metric]
    assert 0 <= metrics['main_metric'] <= 1
    assert results[f'datacomp/{task(key).name}'] == pytest.approx(100 * metrics['main_metric'])
    assert re.search(rf'\| {re.escape(task(key).name)} \| {re.escape(key)} \| '
                     rf'{re.escape(task(key).main_metric)} \| '
                     rf'{100 * metrics["main_metric"]:.2f} \|', printed)
  assert records['retrieval/flickr_1k_test_image_text_retrieval']['metrics']['num_examples'] == 12
  assert records['vtab/pets']['metrics']['num_examples'] == 20
  assert '| Stanford Cars | cars | acc1 | missing |' in printed
  assert '| WinoGAViL | misc/winogavil | jaccard_score_10-12 | not expressible |' in printed
  # Group means over the tasks present, marked partial; ImageNet is ImageNet 1k.
  main = {task(k).name: records[k]['metrics']['main_metric'] for k in PRESENT}
  assert results['datacomp/ImageNet'] == pytest.approx(100 * main['ImageNet 1k'])
  assert results['datacomp/VTAB'] == pytest.approx(100 * main['Oxford-IIIT Pet'])
  assert results['datacomp/Average'] == pytest.approx(100 * np.mean(list(main.values())))
  assert 'datacomp/ImageNet dist. shifts' not in results
  assert re.search(r'\| \*\*VTAB\*\* \| 1 of 13, partial \| mean \| [\d.]+ \|', printed)
  assert re.search(r'\| \*\*Average \(38 tasks\)\*\* \| 6 of 38, partial \| mean \| '
                   rf'{results["datacomp/Average"]:.2f} \|', printed)
  assert '| **ImageNet dist. shifts** | 0 of 6, partial | mean | - |' in printed
  # A cached classifier per class names x templates: the five tasks have three sets.
  assert len(list((out / 'eval_cache').glob('zeroshot_*.npy'))) == 3

  calls.clear()              # everything done: nothing is evaluated again, same numbers
  assert suite(workdir, root, out) == results and calls == []
  with pytest.raises(FileNotFoundError, match=r'--require_all: 31 task\(s\) have no data under'):
    suite(workdir, root, tmp_path / 'other', '--require_all')
  with pytest.raises(FileNotFoundError, match=r'--data_root: \S+ is not a directory'):
    suite(workdir, tmp_path / 'nowhere', out)
  with path.open('a') as f:
    f.write('{"key": "cars", "metr\n')      # a line cut short
  with pytest.raises(ValueError, match=r'datacomp_results.jsonl:7: not a results line'):
    suite(workdir, root, out)


def test_bfloat16_features_on_the_mesh_and_a_run_of_their_own(workdir, root, tmp_path):
  mesh = make_mesh()
  folder = root / task('imagenet1k').folder
  features = {}
  for dtype in ('float32', 'bfloat16'):
    model = load_for_evaluation(mesh, workdir=str(workdir), dtype=dtype)
    data = open_dataset(f'wds:{folder}', image_size=model.image_size)
    features[dtype] = image_features(data, model.module, model.variables, mesh, 16)['features']
  cosine = np.sum(features['float32'] * features['bfloat16'], axis=-1)
  assert not np.array_equal(features['float32'], features['bfloat16'])   # bf16 did run
  assert cosine.min() > 0.99
  # The CLI: a bfloat16 run is not resumed from a float32 run's file, nor reuses its classifier.
  only = tmp_path / 'root'
  only.mkdir()
  (only / task('imagenet1k').folder).symlink_to(folder)
  out = tmp_path / 'out'
  full = suite(workdir, only, out)
  with pytest.raises(ValueError, match=r'datacomp_results.jsonl:1: results of another run'):
    suite(workdir, only, out, '--dtype', 'bfloat16')
  half = suite(workdir, only, tmp_path / 'bf16', '--dtype', 'bfloat16', '--cache_dir',
               str(out / 'eval_cache'))
  assert set(half) == set(full)
  assert len(list((out / 'eval_cache').glob('zeroshot_*.npy'))) == 2   # one per dtype
  record = lines(tmp_path / 'bf16' / 'datacomp_results.jsonl')[0]
  assert record['model'].endswith('-bfloat16')


def test_cli_flags_are_checked():
  for argv, message in ((['--suite', 'datacomp'], '--suite needs --data_root'),
                        (['--suite', 'datacomp', '--data_root', 'x', '--task', 'zeroshot'],
                         '--suite runs its own tasks'),
                        (['--task', 'zeroshot', '--dataset', 'builtin', '--require_all'],
                         '--data_root and --require_all go with --suite')):
    with pytest.raises(SystemExit):
      evaluate_cli.parse_args(['--source', 'tiny'] + argv)
  with pytest.raises(ValueError, match=r"--suite: unknown suite 'vtab'"):
    suite_lib.load_suite('vtab')


TWO_HOSTS = r'''
import json, sys
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from clip_jax import distributed
assert distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                              process_id=int(sys.argv[2]))
import jax
from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate.datasets import open_dataset
from clip_jax.evaluate.loading import load_for_evaluation
from clip_jax.evaluate.run import image_features
import os
argv = ['--workdir', os.environ['WORKDIR'], '--suite', 'datacomp', '--data_root',
        os.environ['ROOT'], '--out', os.environ['OUT'], '--batch_size', '16']
results = evaluate_cli.main(argv)
resumed = evaluate_cli.main(argv)      # everything done: process 0 reads, all agree
print('RESULT ' + json.dumps(dict(process=jax.process_index(), results=results,
                                  resumed=resumed)), flush=True)
'''


@pytest.mark.slow
def test_two_hosts_give_one_hosts_numbers_and_one_file(workdir, root, tmp_path):
  single = suite(workdir, root, tmp_path / 'one')
  outs = [tmp_path / 'host0', tmp_path / 'host1']     # each host its own --out
  results = run_two_workers(TWO_HOSTS, tmp_path, timeout=600, worker_env=lambda i: dict(
      WORKDIR=str(workdir), ROOT=str(root), OUT=str(outs[i])))
  for r in results:
    assert r['results'] == pytest.approx(single, abs=1e-6)
    assert r['resumed'] == pytest.approx(single, abs=1e-4)     # float32 on process 1
  assert len(lines(outs[0] / 'datacomp_results.jsonl')) == 6
  assert not (outs[1] / 'datacomp_results.jsonl').exists()     # process 0 writes


@pytest.mark.slow
def test_the_suite_reads_and_writes_gs(workdir, root, tmp_path):
  local = suite(workdir, root, tmp_path / 'local')
  with GcsEmulator() as gcs:
    for path in sorted(p for p in root.rglob('*') if p.is_file()):
      gcs.upload(f'datacomp/{path.relative_to(root)}', path.read_bytes())
    out = run(['-m', 'clip_jax.evaluate', '--workdir', str(workdir), '--suite', 'datacomp',
               '--data_root', f'gs://{gcs.bucket}/datacomp', '--out', f'gs://{gcs.bucket}/out',
               *BATCH], gcs.env(), str(tmp_path))
    records = [json.loads(l) for l in gcs.download('out/datacomp_results.jsonl').decode()
               .splitlines()]
  assert f'results: gs://{gcs.bucket}/out/datacomp_results.jsonl' in out.stdout
  assert {r['dataset']: 100 * r['metrics']['main_metric'] for r in records} == pytest.approx(
      {k.split('/', 1)[1]: v for k, v in local.items() if k.split('/', 1)[1] in
       {task(t).name for t in PRESENT}}, abs=1e-6)
