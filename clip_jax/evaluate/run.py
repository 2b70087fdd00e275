"""Evaluation tasks on a model, and `run_evaluations`, which the trainer calls periodically.

Each task takes a Flax CLIP module, its variables and the mesh; features are extracted
on the mesh (`features.py`), the scoring runs on the host in numpy / scikit-learn.
Results are flat dicts `{'<task>/<dataset>/<metric>': value}` (percentages).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from clip_jax import storage
from clip_jax.evaluate import datasets as eval_datasets
from clip_jax.evaluate.datasets import EvalData
from clip_jax.evaluate.features import TowerEncoder, encode_arrays, extract_features
from clip_jax.evaluate.linear_probe import linear_probe
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.templates import get_templates
from clip_jax.evaluate.zeroshot import (classification_metrics, params_fingerprint,
                                        zeroshot_classifier, zeroshot_logits)
from clip_jax.models.clip import CLIP

TASKS = ('zeroshot', 'retrieval', 'linear_probe')
RESULTS_FILE = 'eval_results.json'
HISTORY_FILE = 'eval_results.jsonl'


def _check_tokenizer(model: CLIP, tokenizer: Callable[[Sequence[str]], np.ndarray] | None
                     ) -> None:
  if tokenizer is None:
    raise ValueError('tokenizer: zero-shot classification and retrieval encode text; give the '
                     "model's tokenizer")
  context = int(model.text.context_length)
  got = getattr(tokenizer, 'context_length', context)
  if int(got) != context:
    raise ValueError(f'tokenizer: context_length {got} does not match the model\'s text '
                     f'context_length {context}')


def text_encoder(model: CLIP, variables: Any, mesh: Mesh, batch_size: int
                 ) -> Callable[[np.ndarray], np.ndarray]:
  """token ids [n, context] -> L2-normalised text features [n, E], on the mesh."""
  encode_fn = TowerEncoder(model, 'text')
  return lambda tokens: encode_arrays(encode_fn, variables, tokens, mesh, batch_size)


def image_features(data: EvalData, model: CLIP, variables: Any, mesh: Mesh, batch_size: int
                   ) -> dict[str, np.ndarray]:
  """L2-normalised image features of every readable example, with `label` and `index`."""
  return extract_features(TowerEncoder(model, 'image'), variables,
                          data.batches(batch_size, mesh), mesh, input_key='image')


def classifier_fingerprint(model: CLIP, variables: Any) -> str:
  """What a cached zero-shot classifier depends on besides its prompts: the weights and the
  compute dtype (a bfloat16 run must not reuse float32 text features, nor the reverse)."""
  return f'{params_fingerprint(variables)}-{jnp.dtype(model.text.dtype).name}'


def zeroshot_scores(data: EvalData, model: CLIP, variables: Any, mesh: Mesh,
                    tokenizer: Callable[[Sequence[str]], np.ndarray], *, batch_size: int,
                    templates: Sequence[str], classnames: Sequence[str] | None = None,
                    cache_dir: str | None = None) -> dict[str, np.ndarray]:
  """Cosine similarities `logits` [N, classes] of a prompt-ensemble classifier, with `label`
  and `index` (the example's position), for every readable example of `data`."""
  _check_tokenizer(model, tokenizer)
  classnames = list(classnames or data.classnames or [])
  if not classnames:
    raise ValueError(f'{data.name}: no class names; pass a file with one name per line '
                     '(--classnames / config.eval.classnames)')
  fingerprint = classifier_fingerprint(model, variables) if cache_dir else None
  classifier = zeroshot_classifier(text_encoder(model, variables, mesh, batch_size), tokenizer,
                                   classnames, templates, batch_size, cache_dir=cache_dir,
                                   fingerprint=fingerprint)
  feats = image_features(data, model, variables, mesh, batch_size)
  if feats['label'].size and feats['label'].max() >= len(classnames):
    raise ValueError(f'{data.name}: label {feats["label"].max()} but only {len(classnames)} '
                     'class names')
  return {'logits': zeroshot_logits(feats['features'], classifier), 'label': feats['label'],
          'index': feats['index']}


def evaluate_zeroshot(data: EvalData, model: CLIP, variables: Any, mesh: Mesh,
                      tokenizer: Callable[[Sequence[str]], np.ndarray], *, batch_size: int,
                      templates: Sequence[str], classnames: Sequence[str] | None = None,
                      cache_dir: str | None = None) -> dict[str, float]:
  """top1 / top5 / mean_per_class of a prompt-ensemble classifier on `data`."""
  scores = zeroshot_scores(data, model, variables, mesh, tokenizer, batch_size=batch_size,
                           templates=templates, classnames=classnames, cache_dir=cache_dir)
  metrics = classification_metrics(scores['logits'], scores['label'])
  metrics['num_examples'] = float(len(scores['label']))
  return metrics


def retrieval_features(data: EvalData, model: CLIP, variables: Any, mesh: Mesh,
                       tokenizer: Callable[[Sequence[str]], np.ndarray], *, batch_size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Image features [N, E], caption features [T, E] and the image of each caption [T], over
  every caption of every readable image of `data`."""
  _check_tokenizer(model, tokenizer)
  if data.tokenized_captions:   # a stream: one tokenized caption per example in the batches
    feats = image_features(data, model, variables, mesh, batch_size)
    text_feats = encode_arrays(TowerEncoder(model, 'text'), variables, feats['text'], mesh,
                               batch_size)
    return feats['features'], text_feats, np.arange(len(text_feats))
  # A wds stream fills its captions as it is read: an empty list until then.
  if data.captions is None or (data.num_examples is not None and not data.captions):
    raise ValueError(f'{data.name}: no captions; retrieval needs a dataset with captions '
                     '(e.g. captions.jsonl in an image folder)')
  feats = image_features(data, model, variables, mesh, batch_size)
  # Images that could not be read are dropped together with their captions.
  texts, owners = [], []
  for position, example in enumerate(feats['index']):
    texts += data.captions[example]
    owners += [position] * len(data.captions[example])
  encode_text = text_encoder(model, variables, mesh, batch_size)
  text_feats = np.concatenate([encode_text(tokenizer(texts[i:i + batch_size]))
                               for i in range(0, len(texts), batch_size)])
  return feats['features'], text_feats, np.array(owners)


def evaluate_retrieval(data: EvalData, model: CLIP, variables: Any, mesh: Mesh,
                       tokenizer: Callable[[Sequence[str]], np.ndarray], *, batch_size: int
                       ) -> dict[str, float]:
  """Image->text and text->image Recall@1/5/10 over all captions of `data`."""
  images, texts, owners = retrieval_features(data, model, variables, mesh, tokenizer,
                                             batch_size=batch_size)
  metrics = retrieval_recall(images, texts, owners)
  metrics['num_examples'] = float(len(images))
  return metrics


def evaluate_linear_probe(train: EvalData, test: EvalData, model: CLIP, variables: Any,
                          mesh: Mesh, *, batch_size: int, val_fraction: float = 0.2,
                          seed: int = 0) -> dict[str, float]:
  """Logistic regression on frozen image features; C chosen on `train` only."""
  train_feats = image_features(train, model, variables, mesh, batch_size)
  test_feats = image_features(test, model, variables, mesh, batch_size)
  return linear_probe(train_feats['features'], train_feats['label'], test_feats['features'],
                      test_feats['label'], val_fraction=val_fraction, seed=seed)


def read_lines(path: storage.PathLike, what: str) -> list[str]:
  """Non-empty lines of a text file; a clear error naming the file if it is missing."""
  if not storage.is_file(path):
    raise FileNotFoundError(f'{path}: no such file; expected {what}, one per line')
  return [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]


def dataset_specs(value: str) -> list[str]:
  """'builtin, folder:x' -> ['builtin', 'folder:x'] (a config.eval task's dataset list)."""
  return [s.strip() for s in str(value or '').split(',') if s.strip()]


def _with_skipped(metrics: dict[str, float], data: EvalData) -> dict[str, float]:
  """Adds `num_skipped` (unreadable examples, left out of every score) when there are any."""
  if data.skipped:
    metrics = dict(metrics, num_skipped=metrics.get('num_skipped', 0.0) + len(data.skipped))
    if jax.process_index() == 0:
      print(f'{data.name}: skipped {len(data.skipped)} unreadable example(s), e.g. '
            f'{data.skipped[0]}')
  return metrics


def run_evaluations(eval_config: ml_collections.ConfigDict, model: CLIP, variables: Any,
                    mesh: Mesh, tokenizer: Callable[[Sequence[str]], np.ndarray] | None,
                    workdir: str | None = None, step: int | None = None) -> dict[str, float]:
  """Every task of `config.eval` (see config.py::_eval_defaults) on its datasets.

  Returns `{'<task>/<dataset>/<metric>': value}`. With a workdir, process 0 prints a
  Markdown table and writes `eval_results.json` (latest) and appends a line to
  `eval_results.jsonl` (history, with `step`).
  """
  image_size = int(model.visual.image_size)
  batch_size = int(eval_config.batch_size)
  common = dict(split=eval_config.split, image_size=image_size, tokenizer=tokenizer,
                data_dir=eval_config.data_dir or None, max_examples=int(eval_config.max_examples))
  classnames = (read_lines(eval_config.classnames, 'class names')
                if eval_config.classnames else None)
  # No cache by default: during training the weights change between evaluations.
  cache_dir = eval_config.cache_dir or None
  results: dict[str, float] = {}
  start = time.time()
  for spec in dataset_specs(eval_config.zeroshot):
    data = eval_datasets.open_dataset(spec, **common)
    templates = (data.templates if eval_config.templates == 'auto' and data.templates
                 else get_templates(eval_config.templates, data.name))
    metrics = evaluate_zeroshot(data, model, variables, mesh, tokenizer, batch_size=batch_size,
                                templates=templates, classnames=classnames, cache_dir=cache_dir)
    metrics = _with_skipped(metrics, data)
    results.update({f'zeroshot/{data.name}/{k}': v for k, v in metrics.items()})
  for spec in dataset_specs(eval_config.retrieval):
    data = eval_datasets.open_dataset(spec, **common)
    metrics = evaluate_retrieval(data, model, variables, mesh, tokenizer, batch_size=batch_size)
    metrics = _with_skipped(metrics, data)
    results.update({f'retrieval/{data.name}/{k}': v for k, v in metrics.items()})
  for spec in dataset_specs(eval_config.linear_probe):
    test = eval_datasets.open_dataset(spec, **common)
    train = eval_datasets.open_dataset(spec, **dict(common, split=eval_config.train_split))
    metrics = evaluate_linear_probe(train, test, model, variables, mesh, batch_size=batch_size,
                                    val_fraction=float(eval_config.probe_val_fraction))
    metrics = _with_skipped(_with_skipped(metrics, train), test)
    results.update({f'linear_probe/{test.name}/{k}': v for k, v in metrics.items()})
  if workdir and results and jax.process_index() == 0:
    print(markdown_table(results))
    path = write_results(workdir, results, step)
    print(f'evaluation: {len(results)} metrics in {time.time() - start:.1f}s, written to {path}')
  return results


def markdown_table(results: dict[str, float]) -> str:
  """`| task | dataset | metric | value |`, one row per metric, in the order given."""
  lines = ['| task | dataset | metric | value |', '|---|---|---|---|']
  for key, value in results.items():
    task, dataset, metric = key.split('/', 2)
    shown = f'{int(value)}' if metric.startswith('num_') else f'{value:.4g}' if metric == 'C' \
        else f'{value:.2f}'
    lines.append(f'| {task} | {dataset} | {metric} | {shown} |')
  return '\n'.join(lines)


def write_results(workdir: storage.PathLike, results: dict[str, float],
                  step: int | None = None) -> str:
  """Latest results to `<workdir>/eval_results.json`, history to `eval_results.jsonl`."""
  record = {'step': step, 'time': time.time(), 'metrics': results}
  path = storage.write_text(storage.join(workdir, RESULTS_FILE), json.dumps(record, indent=2))
  storage.append_text(storage.join(workdir, HISTORY_FILE), json.dumps(record) + '\n')
  return str(path)
