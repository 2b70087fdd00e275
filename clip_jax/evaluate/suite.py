"""Benchmark suites: DataComp's 38 tasks on clip_benchmark's webdatasets, with its numbers.

  python -m clip_jax.evaluate --suite=datacomp --data_root=ROOT --workdir=runs/b32

The task list is data (`datacomp_tasks.json`, copied from mlfoundations/datacomp; its
`source` names the commit and files). A task's data is looked for where DataComp's own
evaluation looks: `ROOT/wds_<key with / as ->_test` (`fairness/` dropped), in
clip_benchmark's layout (`clip_jax.evaluate.wds`). Each present task is scored as DataComp
scores it (`task_metrics`), with the dataset's own class names and templates:

- classification: `acc1`, `acc5` (None under 5 classes), `mean_per_class_recall`
  (sklearn's balanced accuracy: the mean recall of the classes present), as clip_benchmark;
- retrieval: `image_retrieval_recall@K` (text -> image) and `text_retrieval_recall@K`
  (image -> text, a hit when any caption of the image is among the K best) for K = 1, 5,
  10, and `mean_recall@1`, their mean at K = 1 (DataComp's retr_eval.py);
- iWildCam: `F1-macro_all` (macro F1 over the classes present, as WILDS);
- FMoW, Dollar Street, GeoDE: the worst group's accuracy (top-5 for Dollar Street), groups
  from a field of the `.npy` metadata member, over the groups present (WILDS' rule).

Metrics are fractions, as DataComp writes them. Each finished task is appended at once to
`<out>/<suite>_results.jsonl`, one line per task in DataComp's `eval_results.jsonl` format
(`key`, `dataset`, `metrics` with `main_metric`) plus the model's fingerprint, so
DataComp's `aggregate_scores.py` reads it and a run that stops resumes where it stopped
(tasks already there for the same weights, dtype and `max_examples` are skipped). The
table gives every task's main metric in percent, the group means and the average of the
38 tasks, marked partial while tasks are missing.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import storage
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.run import classifier_fingerprint, retrieval_features, zeroshot_scores
from clip_jax.evaluate.wds import NSHARDS_FILE, wds_dataset
from clip_jax.evaluate.zeroshot import classification_metrics, topk_predictions
from clip_jax.models.clip import CLIP

SUITE_FILES = {'datacomp': 'datacomp_tasks.json'}
SUITES = tuple(SUITE_FILES)
SPLIT = 'test'            # DataComp scores the test split only
RECALL_KS = (1, 5, 10)    # DataComp's retr_eval.py
AVERAGE = 'Average'       # the row of the mean over every task of the suite


@dataclasses.dataclass(frozen=True)
class SuiteTask:
  """One task of a suite file (see datacomp_tasks.json)."""
  key: str                 # DataComp's key, e.g. 'vtab/caltech101'
  name: str                # its display name, e.g. 'Caltech-101' (the groups list these)
  folder: str              # where its data is under the data root
  kind: str                # 'classification' | 'retrieval' | another kind, unsupported
  main_metric: str
  size: int                # examples in DataComp's copy of the set
  num_classes: int | None = None
  tags: tuple[str, ...] = ()
  metadata_fields: tuple[str, ...] = ()            # what the `.npy` members hold, in order
  worst_group: dict[str, Any] | None = None        # {'field': name, 'top': 1 or 5}
  unsupported: str = ''                            # why it cannot be scored here

  @classmethod
  def from_json(cls, entry: dict[str, Any]) -> 'SuiteTask':
    entry = dict(entry, tags=tuple(entry.get('tags', ())),
                 metadata_fields=tuple(entry.get('metadata_fields', ())))
    return cls(**entry)


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  source: str
  tasks: tuple[SuiteTask, ...]
  groups: dict[str, tuple[str, ...]]        # group -> task names (DataComp's aggregate_scores)

  @property
  def supported(self) -> tuple[SuiteTask, ...]:
    return tuple(t for t in self.tasks if not t.unsupported)


def load_suite(name: str) -> Suite:
  """The suite `name` (SUITES) from the package's data file."""
  if name not in SUITE_FILES:
    raise ValueError(f'--suite: unknown suite {name!r}; expected one of {", ".join(SUITES)}')
  text = importlib.resources.files('clip_jax.evaluate').joinpath(SUITE_FILES[name]).read_text()
  doc = json.loads(text)
  tasks = tuple(SuiteTask.from_json(entry) for entry in doc['tasks'])
  return Suite(name=name, source=doc['source'], tasks=tasks,
               groups={g: tuple(names) for g, names in doc['groups'].items()})


def task_root(data_root: storage.PathLike, task: SuiteTask) -> storage.PathLike:
  return storage.join(data_root, task.folder)


def is_present(data_root: storage.PathLike, task: SuiteTask) -> bool:
  """The task's data is there when its split's nshards.txt is (the file clip_benchmark
  needs first); anything else missing is reported when the task is read."""
  return (not task.unsupported and
          storage.is_file(storage.join(task_root(data_root, task), SPLIT, NSHARDS_FILE)))


# --- metrics, as DataComp computes them --------------------------------------------------

def worst_group_accuracy(correct: np.ndarray, groups: np.ndarray) -> float:
  """The lowest accuracy among the groups that have examples (WILDS' worst group: groups
  without examples are not candidates)."""
  correct, groups = np.asarray(correct, bool), np.asarray(groups).astype(np.int64)
  if not len(correct):
    raise ValueError('worst-group accuracy: no example')
  return float(min(correct[groups == g].mean() for g in np.unique(groups)))


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Macro F1 over the classes present in `labels` (WILDS' F1(average='macro'))."""
  from sklearn.metrics import f1_score   # pylint: disable=import-outside-toplevel
  return float(f1_score(labels, predictions, average='macro', labels=np.unique(labels)))


def classification_task_metrics(task: SuiteTask, logits: np.ndarray, labels: np.ndarray,
                                metadata: Sequence[np.ndarray | None] | None = None
                                ) -> dict[str, float | None]:
  """DataComp's metrics of a classification task from its logits [N, classes] and labels;
  `metadata[i]` is example i's `.npy` vector (worst-group tasks need it)."""
  ours = classification_metrics(logits, labels)
  metrics: dict[str, float | None] = {
      'acc1': ours['top1'] / 100.0,
      'acc5': ours['top5'] / 100.0 if logits.shape[1] >= 5 else None,   # clip_benchmark's rule
      'mean_per_class_recall': ours['mean_per_class'] / 100.0}
  if task.main_metric == 'F1-macro_all':
    metrics['F1-macro_all'] = macro_f1(labels, topk_predictions(logits, 1)[:, 0])
  if task.worst_group:
    field, top = task.worst_group['field'], int(task.worst_group['top'])
    if metadata is None or any(m is None for m in metadata):
      raise ValueError(f'{task.name}: {task.main_metric} needs every sample\'s .npy member '
                       f'({", ".join(task.metadata_fields)})')
    rows = np.stack([np.asarray(m).reshape(-1) for m in metadata])
    column = task.metadata_fields.index(field)
    if rows.shape[1] <= column:
      raise ValueError(f'{task.name}: .npy metadata has {rows.shape[1]} fields; expected '
                       f'{len(task.metadata_fields)} ({", ".join(task.metadata_fields)})')
    hits = np.any(topk_predictions(logits, min(top, logits.shape[1])) == labels[:, None], -1)
    metrics[task.main_metric] = worst_group_accuracy(hits, rows[:, column])
  return metrics


def retrieval_task_metrics(image_features: np.ndarray, text_features: np.ndarray,
                           text_to_image: np.ndarray) -> dict[str, float]:
  """clip_benchmark's retrieval names (image_retrieval = text -> image) and mean_recall@1."""
  ours = retrieval_recall(image_features, text_features, text_to_image, ks=RECALL_KS)
  metrics = {}
  for k in RECALL_KS:
    metrics[f'image_retrieval_recall@{k}'] = ours[f'text_to_image_R{k}'] / 100.0
    metrics[f'text_retrieval_recall@{k}'] = ours[f'image_to_text_R{k}'] / 100.0
  metrics['mean_recall@1'] = 0.5 * (metrics['image_retrieval_recall@1'] +
                                    metrics['text_retrieval_recall@1'])
  return metrics


def evaluate_task(task: SuiteTask, data_root: storage.PathLike, model: CLIP, variables: Any,
                  mesh: Mesh, tokenizer: Callable[[Sequence[str]], np.ndarray], *,
                  batch_size: int, cache_dir: str | None = None, max_examples: int = 0
                  ) -> dict[str, float | None]:
  """One task's metrics (fractions), with `main_metric` and `num_examples`."""
  root = task_root(data_root, task)
  data = wds_dataset(root, split=SPLIT, image_size=int(model.visual.image_size),
                     max_examples=max_examples)
  is_retrieval = data.captions is not None
  if is_retrieval != (task.kind == 'retrieval'):
    raise ValueError(f'{root}: dataset_type.txt makes it a '
                     f'{"retrieval" if is_retrieval else "classification"} set; '
                     f'{task.name} ({task.key}) is a {task.kind} task')
  if task.kind == 'retrieval':
    images, texts, owners = retrieval_features(data, model, variables, mesh, tokenizer,
                                               batch_size=batch_size)
    metrics: dict[str, float | None] = retrieval_task_metrics(images, texts, owners)
    count = len(images)
  else:
    for what, value in (('classnames.txt', data.classnames),
                        ('zeroshot_classification_templates.txt', data.templates)):
      if not value:
        raise ValueError(f'{root}: no {what}; {task.name} is scored with the set\'s own class '
                         'names and templates')
    scores = zeroshot_scores(data, model, variables, mesh, tokenizer, batch_size=batch_size,
                             templates=data.templates, classnames=data.classnames,
                             cache_dir=cache_dir)
    metadata = [data.metadata[i] for i in scores['index']] if data.metadata else None
    metrics = classification_task_metrics(task, scores['logits'], scores['label'], metadata)
    count = len(scores['label'])
  metrics['main_metric'] = metrics[task.main_metric]
  metrics['num_examples'] = float(count)
  if data.skipped:
    metrics['num_skipped'] = float(len(data.skipped))
    if jax.process_index() == 0:
      print(f'{task.name}: skipped {len(data.skipped)} unreadable example(s), e.g. '
            f'{data.skipped[0]}')
  return metrics


# --- the run: resume, write, summarise -----------------------------------------------------

def results_path(out: storage.PathLike, suite: Suite) -> storage.PathLike:
  return storage.join(out, f'{suite.name}_results.jsonl')


def read_results(path: storage.PathLike, run_id: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Metrics by task key of a results file written for `run_id`; refuses another run's."""
  if not storage.is_file(path):
    return {}
  done = {}
  for number, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      theirs = {k: record.get(k) for k in run_id}
      key, metrics = record['key'], record['metrics']
    except (json.JSONDecodeError, KeyError, AttributeError):
      raise ValueError(f'{path}:{number}: not a results line (a JSON object with key and '
                       'metrics); remove the line to evaluate that task again') from None
    if theirs != run_id:
      raise ValueError(f'{path}:{number}: results of another run ({theirs}; this one is '
                       f'{run_id}); evaluate into another --out, or remove the file')
    done[key] = metrics
  return done


def _from_process_0(values: np.ndarray) -> np.ndarray:
  """Process 0's values on every host: all hosts must run the same tasks (their feature
  programs are collective), even where their view of the files differs."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils   # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.broadcast_one_to_all(values))


def summarize(suite: Suite, main: dict[str, float]) -> list[tuple[str, int, int, float | None]]:
  """(row, tasks scored, tasks in it, mean main metric or None) for every group of the suite
  and the average over all its tasks; `main` is task name -> main metric."""
  rows = []
  for group, names in list(suite.groups.items()) + [(AVERAGE, tuple(t.name for t in suite.tasks))]:
    values = [main[n] for n in names if n in main]
    rows.append((group, len(values), len(names), float(np.mean(values)) if values else None))
  return rows


def summary_table(suite: Suite, main: dict[str, float], missing: Sequence[SuiteTask]) -> str:
  """Markdown: every task's main metric (percent), then the group means and the average."""
  missing_keys = {t.key for t in missing}
  lines = ['| task | key | main metric | % |', '|---|---|---|---|']
  for task in suite.tasks:
    shown = (f'{100 * main[task.name]:.2f}' if task.name in main else
             'not expressible' if task.unsupported else
             'missing' if task.key in missing_keys else 'not run')
    lines.append(f'| {task.name} | {task.key} | {task.main_metric} | {shown} |')
  for group, scored, total, mean in summarize(suite, main):
    label = f'{group} ({total} tasks)' if group == AVERAGE else group
    partial = '' if scored == total else ', partial'
    shown = f'{100 * mean:.2f}' if mean is not None else '-'
    lines.append(f'| **{label}** | {scored} of {total}{partial} | mean | {shown} |')
  return '\n'.join(lines)


def run_suite(name: str, data_root: storage.PathLike, model: CLIP, variables: Any, mesh: Mesh,
              tokenizer: Callable[[Sequence[str]], np.ndarray], *, out: storage.PathLike,
              batch_size: int, cache_dir: str | None = None, require_all: bool = False,
              max_examples: int = 0) -> dict[str, float]:
  """Runs every task of suite `name` whose data is under `data_root`; see the module
  docstring. Returns `{'<suite>/<task name>': main metric, '<suite>/<group>': mean}` in
  percent (the average is '<suite>/Average')."""
  suite = load_suite(name)
  path = results_path(out, suite)
  run_id = {'model': classifier_fingerprint(model, variables), 'max_examples': int(max_examples)}
  lead = jax.process_index() == 0
  done, refusal = {}, None
  if lead:
    try:
      if not storage.is_dir(data_root):
        raise FileNotFoundError(f'--data_root: {data_root} is not a directory; expected the '
                                "folder holding the suite's wds_<task>_test folders")
      done = read_results(path, run_id)
    except (ValueError, FileNotFoundError) as error:   # raised below, once every host knows
      refusal = error
  tasks = suite.supported
  flags = _from_process_0(np.array([refusal is None] + [is_present(data_root, t) for t in tasks]
                                   + [t.key in done for t in tasks], np.int32)).astype(bool)
  if not flags[0]:
    raise refusal or ValueError(f'{path}: process 0 refused to start (see its log)')
  present, finished = flags[1:1 + len(tasks)], flags[1 + len(tasks):]
  # The scores of the tasks done before (float32 on the other hosts: they only print them).
  earlier = _from_process_0(np.array([done[t.key]['main_metric'] if t.key in done else np.nan
                                      for t in tasks], np.float32))
  missing = [t for t, here in zip(tasks, present) if not here]
  if lead:
    print(f'{suite.name}: {len(tasks) - len(missing)} of {len(suite.tasks)} tasks '
          f'under {data_root}' + (f'; missing: {", ".join(t.folder for t in missing)}'
                                   if missing else ''))
    for task in suite.tasks:
      if task.unsupported:
        print(f'{task.name} ({task.key}): not expressible here: {task.unsupported}')
  if missing and require_all:
    raise FileNotFoundError(
        f'--require_all: {len(missing)} task(s) have no data under {data_root}: '
        f'{", ".join(t.folder for t in missing)} (each needs <folder>/{SPLIT}/{NSHARDS_FILE})')
  main = {t.name: done[t.key]['main_metric'] if lead else float(score)
          for t, ok, score in zip(tasks, finished, earlier) if ok}
  for task, here, ok in zip(tasks, present, finished):
    if not here or ok:
      if ok and lead:
        print(f'{task.name}: {100 * main[task.name]:.2f} (from {path})')
      continue
    start = time.time()
    metrics = evaluate_task(task, data_root, model, variables, mesh, tokenizer,
                            batch_size=batch_size, cache_dir=cache_dir,
                            max_examples=max_examples)
    main[task.name] = metrics['main_metric']
    if lead:
      record = dict(key=task.key, dataset=task.name, metrics=metrics, **run_id)
      storage.append_text(path, json.dumps(record) + '\n')
      count = int(metrics['num_examples'])
      note = (f'; DataComp\'s set has {task.size}' if count != task.size and not max_examples
              else '')
      print(f'{task.name}: {task.main_metric} {100 * metrics["main_metric"]:.2f} '
            f'({count} examples{note}, {time.time() - start:.0f} s)', flush=True)
  if lead:
    print(summary_table(suite, main, missing))
    print(f'results: {path}')
  results = {f'{suite.name}/{task}': 100 * value for task, value in main.items()}
  results.update({f'{suite.name}/{group}': 100 * mean
                  for group, _, _, mean in summarize(suite, main) if mean is not None})
  return results
