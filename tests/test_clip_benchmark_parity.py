"""Equal to clip_benchmark: the numbers of `python -m clip_jax.evaluate --suite=datacomp`
are clip_benchmark's own, on the same images.

Datasets are written by clip_benchmark's own exporter (`webdataset_builder.convert_dataset`
and `convert_retrieval_dataset`, from image files in four formats): a classification set
of 10 classes and a retrieval set with 3 to 5 captions per image, scikit-image's
photographs cropped to varied sizes and aspect ratios, so that the resize and the crop
matter. A small clip_jax model (CLIP BPE vocabulary) is evaluated natively by the suite
runner, exported with `python -m clip_jax.convert export`, and the export is evaluated by
clip_benchmark's CLI (`clip_benchmark eval --dataset wds/... --model local-dir:...`), in a
process of its own (torch before tensorflow, see tests/conftest.py). Required: top-1,
top-5 and mean per-class recall, and Recall@1/5/10 both ways, within 0.1 point; and
clip_benchmark's pixels (webdataset's decoding, open_clip's eval transform) equal ours.
"""

import builtins
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from clip_jax import checkpoint
from clip_jax.api import ClipModel
from clip_jax.convert.__main__ import main as convert_main
from clip_jax.data.eval_input import load_image
from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate import suite as suite_lib
from clip_jax.evaluate.datasets import open_dataset
from clip_jax.evaluate.run import zeroshot_scores
from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.sharding import make_mesh
from localhost_workers import TESTS
from test_wds_eval import (CLASSNAMES, FORMATS, PHOTOS, TEMPLATES, crop, encode, photo,
                           small_clip_workdir)

pytestmark = [pytest.mark.torch, pytest.mark.slow]

IMAGE_SIZE = 48
PER_CLASS = 4            # 40 examples: a point is 2.5 of them... so equal means equal
TOLERANCE = 0.1          # points (percent)
CLASSIFICATION = 'vtab/pets'           # the suite's folders the two sets are laid out as
RETRIEVAL = 'retrieval/flickr_1k_test_image_text_retrieval'


def legacy_float(value):
  """`float()` as numpy < 2.4 did it for one-element arrays. clip_benchmark 1.6.2's
  `zeroshot_classification.accuracy` calls float() on a 1-element array, which numpy 2.4
  refuses (the deprecation of NumPy 1.25 expired); installed as that module's `float`, it
  lets clip_benchmark's own code run, unchanged otherwise."""
  if isinstance(value, np.ndarray):
    return builtins.float(value.item())
  return builtins.float(value)


# Runs in its own process: clip_benchmark's exporter writes the two sets from the image
# files, then its CLI evaluates the export on them, and its dataset's pixels are saved.
CLIP_BENCHMARK = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
work, export = sys.argv[2], sys.argv[3]
import torch
import open_clip
from clip_benchmark import cli, webdataset_builder as builder
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification
from test_clip_benchmark_parity import legacy_float
zeroshot_classification.float = legacy_float

spec = json.load(open(os.path.join(work, 'spec.json')))

class Files(list):                 # what convert_dataset takes: (input, output) pairs
  classes, templates = spec['classnames'], spec['templates']

roots = {kind: os.path.join(work, 'data', spec['folders'][kind]) for kind in spec['folders']}
builder.convert_dataset(Files((p, l) for p, l in spec['classification']), 'test',
                        roots['classification'], transform=builder.path_to_bytes, verbose=False)
builder.convert_retrieval_dataset(Files((p, c) for p, c in spec['retrieval']), 'test',
                                  roots['retrieval'], transform=builder.path_to_bytes,
                                  verbose=False)

model, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{export}')
model.eval()
dataset = build_dataset('wds/pixels', root=roots['classification'], transform=preprocess,
                        split='test', task='zeroshot_classification')
torch.save(torch.stack([image for image, _ in dataset]), os.path.join(work, 'pixels.pt'))
# Its logits (100 x cosine), by its own classifier and classification loop.
classifier = zeroshot_classification.zero_shot_classifier(
    model, open_clip.get_tokenizer(f'local-dir:{export}'), dataset.classes, dataset.templates,
    'cpu', amp=False)
loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, num_workers=0)
logits, _ = zeroshot_classification.run_classification(model, classifier, loader, 'cpu', amp=False)
torch.save(logits, os.path.join(work, 'logits.pt'))

for kind, task in (('classification', 'zeroshot_classification'),
                   ('retrieval', 'zeroshot_retrieval')):
  sys.argv = ['clip_benchmark', 'eval', '--dataset', f'wds/{kind}', '--dataset_root',
              roots[kind], '--task', task, '--model', f'local-dir:{export}', '--pretrained',
              'export', '--no_amp', '--batch_size', '16', '--num_workers', '0',
              '--recall_k', '1', '5', '10', '--output', os.path.join(work, f'{kind}.json'),
              '--quiet']
  cli.main()
'''


def image_files(folder, rng):
  """Classification (path, label) and retrieval (path, captions) items: crops in turn
  stored as webp, png, jpg and jpeg files."""
  os.makedirs(folder, exist_ok=True)
  extensions = list(FORMATS)

  def save(image, i):
    extension = extensions[i % len(extensions)]
    path = os.path.join(folder, f'{i:03d}.{extension}')
    with open(path, 'wb') as f:
      f.write(encode(image, extension))
    return path

  classification = []
  for label, name in enumerate(PHOTOS[:len(CLASSNAMES)]):
    for _ in range(PER_CLASS):
      classification.append((save(crop(photo(name), rng), len(classification)), label))
  order = rng.permutation(len(classification))
  classification = [classification[i] for i in order]
  retrieval = []
  for i in range(16):
    name = PHOTOS[i % len(PHOTOS)]
    captions = [f'a {name.replace("_", " ")} photo number {i}, version {j}'
                for j in range(int(rng.integers(3, 6)))]
    retrieval.append((save(crop(photo(name), rng), 100 + i), captions))
  return classification, retrieval


def fitted_model(path, classification, steps: int = 30):
  """The small CLIP-BPE model, its random weights nudged by a few Adam steps towards
  classifying the photographs from their prompts, so that its predictions differ from
  image to image (a random CLIP gives every image the same class), saved as a workdir."""
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  model = small_clip_workdir(path / 'random', image_size=IMAGE_SIZE, seed=2)
  images = np.stack([load_image(p, IMAGE_SIZE) for p, _ in classification])
  labels = np.array([label for _, label in classification])
  prompts = model.tokenizer([TEMPLATES[0].format(c=c) for c in CLASSNAMES])

  def loss(params):
    variables = {'params': params}
    image = l2_normalize(model.module.apply(variables, images, method=CLIP.encode_image))
    text = l2_normalize(model.module.apply(variables, prompts, method=CLIP.encode_text))
    return optax.softmax_cross_entropy_with_integer_labels(20 * image @ text.T, labels).mean()

  optimizer = optax.adam(1e-3)
  step = jax.jit(lambda params, state: optimizer.update(jax.grad(loss)(params), state, params))
  params = jax.tree.map(jnp.asarray, model.params)
  state = optimizer.init(params)
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  checkpoint.save_model(str(path / 'run'), model.experiment, {'params': params})
  return ClipModel(model.config, {'params': params}, model.experiment)


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  work = tmp_path_factory.mktemp('parity')
  classification, retrieval = image_files(str(work / 'files'), np.random.default_rng(3))
  model = fitted_model(work, classification)
  export = work / 'export'
  assert convert_main(['export', '--workdir', str(work / 'run'), '--format', 'openai',
                       '--out', str(export / 'model.safetensors')]) == 0
  suite = suite_lib.load_suite('datacomp')
  folders = {kind: next(t.folder for t in suite.tasks if t.key == key)
             for kind, key in (('classification', CLASSIFICATION), ('retrieval', RETRIEVAL))}
  (work / 'spec.json').write_text(json.dumps(dict(
      classification=classification, retrieval=retrieval, classnames=list(CLASSNAMES),
      templates=list(TEMPLATES), folders=folders)))
  done = subprocess.run([sys.executable, '-c', CLIP_BENCHMARK, TESTS, str(work), str(export)],
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
  theirs = {kind: json.loads((work / f'{kind}.json').read_text())['metrics']
            for kind in folders}
  import torch   # pylint: disable=import-outside-toplevel  (conftest loads it first)
  pixels = torch.load(work / 'pixels.pt').numpy().transpose(0, 2, 3, 1)
  logits = torch.load(work / 'logits.pt').numpy()
  # Ours: the suite runner on the same folders, as a user runs it.
  results = evaluate_cli.main(['--workdir', str(work / 'run'), '--suite', 'datacomp',
                               '--data_root', str(work / 'data'), '--out', str(work / 'out'),
                               '--batch_size', '16'])
  records = {json.loads(line)['key']: json.loads(line)['metrics']
             for line in (work / 'out' / 'datacomp_results.jsonl').read_text().splitlines()}
  return dict(work=work, model=model, theirs=theirs, pixels=pixels, logits=logits,
              results=results,
              ours={'classification': records[CLASSIFICATION], 'retrieval': records[RETRIEVAL]},
              root={kind: work / 'data' / folder for kind, folder in folders.items()})


def test_the_pixels_are_clip_benchmarks(evaluated):
  data = open_dataset(f'wds:{evaluated["root"]["classification"]}', image_size=IMAGE_SIZE)
  batches = list(data.batches(16, make_mesh()))
  ours = np.concatenate([b['image'][b['mask']] for b in batches])
  assert ours.shape == evaluated['pixels'].shape == (10 * PER_CLASS, IMAGE_SIZE, IMAGE_SIZE, 3)
  np.testing.assert_allclose(ours, evaluated['pixels'], atol=1e-5, rtol=0)


def test_zero_shot_classification_equals_clip_benchmarks(evaluated):
  ours, theirs = evaluated['ours']['classification'], evaluated['theirs']['classification']
  print('classification (ours, clip_benchmark):',
        {k: (100 * ours[k], 100 * theirs[k]) for k in theirs})
  for metric in ('acc1', 'acc5', 'mean_per_class_recall'):
    assert abs(100 * ours[metric] - 100 * theirs[metric]) <= TOLERANCE, metric
  assert ours['num_examples'] == 10 * PER_CLASS
  # The same logits as clip_benchmark's (100 x cosine), so the same top-5 of every image;
  # and not a degenerate case: predictions vary, hits and misses both.
  model, mesh = evaluated['model'], make_mesh()
  data = open_dataset(f'wds:{evaluated["root"]["classification"]}', image_size=IMAGE_SIZE)
  scores = zeroshot_scores(data, model.module, model.variables, mesh, model.tokenizer,
                           batch_size=16, templates=data.templates, classnames=data.classnames)
  logits = 100 * scores['logits']
  np.testing.assert_allclose(logits, evaluated['logits'], atol=2e-4, rtol=0)
  np.testing.assert_array_equal(np.argsort(-logits, -1)[:, :5],
                                np.argsort(-evaluated['logits'], -1)[:, :5])
  assert len(set(np.argmax(logits, -1).tolist())) > 3
  assert 0 < ours['acc1'] < ours['acc5'] < 1


def test_retrieval_recall_equals_clip_benchmarks(evaluated):
  ours, theirs = evaluated['ours']['retrieval'], evaluated['theirs']['retrieval']
  print('retrieval (ours, clip_benchmark):', {k: (100 * ours[k], 100 * theirs[k]) for k in theirs})
  assert set(theirs) == {f'{d}_retrieval_recall@{k}' for d in ('image', 'text') for k in (1, 5, 10)}
  for metric, value in theirs.items():
    assert abs(100 * ours[metric] - 100 * value) <= TOLERANCE, metric
  assert ours['num_examples'] == 16
  assert ours['mean_recall@1'] == pytest.approx(
      (theirs['image_retrieval_recall@1'] + theirs['text_retrieval_recall@1']) / 2, abs=1e-3)
  assert len({round(v, 6) for v in theirs.values()}) > 2       # not all 0 or all 1
