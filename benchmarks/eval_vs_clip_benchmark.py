r"""clip_jax vs clip_benchmark: zero-shot evaluation of one model on one webdataset.

  python benchmarks/eval_vs_clip_benchmark.py --model=ViT-B/32 --images=320 --batch=64

The set is written in clip_benchmark's layout (webdataset's ShardWriter, lossless webp
as clip_benchmark's exporter writes by default, 10 classes, 3 templates) from scikit-
image's photographs, cropped to varied sizes (102 to 1411 px sides) so that decoding and
resizing cost what they cost on real sets. The model is `clip_jax.load(model, seed=0)`
(random weights), exported to open_clip's layout, so both frameworks run the same weights
in float32.

Timed on each side: one pass over the set, from reading the tars to the class scores
(decode, open_clip's eval transform, image tower, cosine against the classifier), after a
warm-up pass over one batch (compilation and first calls excluded on both sides); the text
classifier is built before the pass and not timed (both cache it per task).
- clip_jax: the suite's path in this process: `wds:ROOT` (`clip_jax.evaluate.wds`), the
  features on every local device (`image_features`), `zeroshot_logits`.
- clip_benchmark: its own code in a process of its own (torch and tensorflow apart):
  `build_dataset('wds/...')` with open_clip's transform, `DataLoader(dataset.batched(B),
  num_workers=W)` as its CLI builds it (default 4 workers, its CLI's default),
  `zero_shot_classifier`, `run_classification` with amp off (on a CPU, autocast would
  mean bfloat16).

The last line is `ratio clip_jax/clip_benchmark images/s: X.XX` (above 1: clip_jax faster).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

import clip_jax  # noqa: E402  (after the path set-up, so the checkout is imported)
from clip_jax.convert import export_openai  # noqa: E402
from clip_jax.evaluate.datasets import open_dataset  # noqa: E402
from clip_jax.evaluate.loading import load_for_evaluation  # noqa: E402
from clip_jax.evaluate.run import image_features, text_encoder  # noqa: E402
from clip_jax.evaluate.zeroshot import zeroshot_classifier, zeroshot_logits  # noqa: E402
from clip_jax.sharding import make_mesh  # noqa: E402

CLASSES = ('astronaut', 'chelsea', 'coffee', 'rocket', 'motorcycle_left', 'hubble_deep_field',
           'retina', 'ihc', 'color', 'camera')
TEMPLATES = ('a photo of a {c}.', 'a close-up photo of the {c}.', 'itap of my {c}')

CLIP_BENCHMARK = r'''
import json, sys, time
import torch
import open_clip
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification as zsc
root, export, batch, workers, threads = sys.argv[1:6]
if int(threads):
  torch.set_num_threads(int(threads))
model, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{export}')
model.eval()
tokenizer = open_clip.get_tokenizer(f'local-dir:{export}')

def loader():
  dataset = build_dataset('wds/bench', root=root, transform=preprocess, split='test',
                          task='zeroshot_classification')
  return dataset, torch.utils.data.DataLoader(dataset.batched(int(batch)), batch_size=None,
                                              num_workers=int(workers))

dataset, data = loader()
classifier = zsc.zero_shot_classifier(model, tokenizer, dataset.classes, dataset.templates,
                                      'cpu', amp=False)
with torch.no_grad():                       # warm-up: one batch
  model.encode_image(next(iter(data))[0])
start = time.perf_counter()
logits, target = zsc.run_classification(model, classifier, data, 'cpu', amp=False)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, images=len(target),
                      top1=float((logits.argmax(1) == target).float().mean()))))
'''


def write_set(root: str, count: int, shards: int) -> None:
  """`count` crops of the photographs in `shards` tars, clip_benchmark's layout under `root`
  (webdataset refuses to run more DataLoader workers than there are shards)."""
  import skimage  # pylint: disable=import-outside-toplevel
  import webdataset  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  folder = os.path.join(os.path.dirname(skimage.__file__), 'data')
  photos = []
  for name in CLASSES:
    path = os.path.join(folder, name + '.png')
    with Image.open(path if os.path.exists(path) else path[:-4] + '.jpg') as image:
      photos.append(image.convert('RGB'))
  os.makedirs(os.path.join(root, 'test'))
  sink = webdataset.ShardWriter(os.path.join(root, 'test', '%d.tar'),
                                maxcount=-(-count // shards), verbose=0)
  for index in range(count):
    label = index % len(CLASSES)
    image = photos[label]
    w = int(rng.integers(image.width // 2, image.width + 1))
    h = int(rng.integers(image.height // 2, image.height + 1))
    left = int(rng.integers(0, image.width - w + 1))
    top = int(rng.integers(0, image.height - h + 1))
    buffer = io.BytesIO()
    image.crop((left, top, left + w, top + h)).save(buffer, format='webp', lossless=True)
    sink.write({'__key__': f's{index:07d}', 'webp': buffer.getvalue(), 'cls': label})
  written = sink.shard
  sink.close()
  with open(os.path.join(root, 'test', 'nshards.txt'), 'w') as f:
    print(written, file=f)
  with open(os.path.join(root, 'classnames.txt'), 'w') as f:
    print(*(c.replace('_', ' ') for c in CLASSES), sep='\n', file=f)
  with open(os.path.join(root, 'zeroshot_classification_templates.txt'), 'w') as f:
    print(*TEMPLATES, sep='\n', file=f)


def time_clip_jax(model, root: str, batch: int) -> dict:
  mesh = make_mesh()
  data = open_dataset(f'wds:{root}', image_size=model.image_size)
  classifier = zeroshot_classifier(text_encoder(model.module, model.variables, mesh, batch),
                                   model.tokenizer, data.classnames, data.templates, batch)
  warm = open_dataset(f'wds:{root}', image_size=model.image_size, max_examples=batch)
  image_features(warm, model.module, model.variables, mesh, batch)
  start = time.perf_counter()
  feats = image_features(data, model.module, model.variables, mesh, batch)
  logits = zeroshot_logits(feats['features'], classifier)
  seconds = time.perf_counter() - start
  return dict(seconds=seconds, images=len(feats['label']),
              top1=float(np.mean(logits.argmax(1) == feats['label'])), devices=mesh.size)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='ViT-B/32')
  parser.add_argument('--images', type=int, default=320)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--workers', type=int, default=4, help="clip_benchmark's DataLoader workers")
  parser.add_argument('--torch_threads', type=int, default=0, help='0: torch decides')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as work:
    root, export = os.path.join(work, 'set'), os.path.join(work, 'export')
    write_set(root, args.images, shards=2 * max(1, args.workers))
    model = clip_jax.load(args.model, seed=0)
    weights, _ = export_openai(model.config, model.variables, export)
    model = load_for_evaluation(make_mesh(), weights=weights)   # what clip_benchmark reads
    ours = time_clip_jax(model, root, args.batch)
    done = subprocess.run([sys.executable, '-c', CLIP_BENCHMARK, root, export, str(args.batch),
                           str(args.workers), str(args.torch_threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      raise SystemExit(f'clip_benchmark failed:\n{done.stderr[-5000:]}')
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
  rows = {'clip_jax': ours, 'clip_benchmark': theirs}
  print(f'{args.model}, {ours["images"]} images, batch {args.batch}, float32, '
        f'{os.cpu_count()} CPU cores ({ours["devices"]} JAX device(s); clip_benchmark: '
        f'{args.workers} DataLoader workers)')
  print('| | seconds | images/s | top-1 (same weights) |')
  print('|---|---|---|---|')
  for name, row in rows.items():
    row['images_per_second'] = row['images'] / row['seconds']
    print(f'| {name} | {row["seconds"]:.1f} | {row["images_per_second"]:.1f} | '
          f'{100 * row["top1"]:.1f}% |')
  ratio = ours['images_per_second'] / theirs['images_per_second']
  print(f'ratio clip_jax/clip_benchmark images/s: {ratio:.2f}')
  return dict(rows, ratio=ratio)


if __name__ == '__main__':
  main()
