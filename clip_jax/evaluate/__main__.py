"""python -m clip_jax.evaluate: zero-shot classification, retrieval or a linear probe.

  python -m clip_jax.evaluate --workdir=runs/tiny --task=zeroshot --dataset=builtin
  python -m clip_jax.evaluate --source=ViT-B-32.pt --task=zeroshot \\
      --dataset=tfds:cifar10 --data_dir=~/tensorflow_datasets
  python -m clip_jax.evaluate --source=runs/b32 --task=retrieval --dataset=folder:coco_val
  python -m clip_jax.evaluate --workdir=runs/tiny --task=linear_probe --dataset=folder:pets

Prints a Markdown table and writes eval_results.json (and a line of eval_results.jsonl)
to --out (default: the workdir, else the current directory).
"""

from __future__ import annotations

import argparse
import sys

from clip_jax import storage
from clip_jax.config import get_config
from clip_jax.evaluate.features import fit_batch_size
from clip_jax.evaluate.loading import load_for_evaluation
from clip_jax.evaluate.run import TASKS, run_evaluations
from clip_jax.evaluate.templates import TEMPLATE_SETS
from clip_jax.sharding import make_mesh


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  defaults = get_config().eval
  parser = argparse.ArgumentParser(
      prog='python -m clip_jax.evaluate', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument('--workdir', default='', help='a clip_jax run (checkpoint + config.json)')
  model.add_argument('--source', default='',
                     help='anything clip_jax.load reads: a PyTorch/safetensors file, an '
                          'imported workdir, or an architecture name (random init)')
  parser.add_argument('--task', required=True,
                      help=f'one or more of {", ".join(TASKS)}, comma-separated')
  parser.add_argument('--dataset', required=True,
                      help='builtin, builtin_seen, builtin_captions (clip_jax.evaluate.datasets), '
                           'folder:PATH (or a directory), tfds:NAME or shards:GLOB; '
                           'comma-separated for several')
  parser.add_argument('--split', default=defaults.split)
  parser.add_argument('--train_split', default=defaults.train_split,
                      help='the split the linear probe is fitted on')
  parser.add_argument('--templates', default=defaults.templates,
                      help=f'{", ".join(TEMPLATE_SETS)}, auto (by dataset) or a file with one '
                           'template per line')
  parser.add_argument('--classnames', default='', help='a file with one class name per line')
  parser.add_argument('--batch_size', type=int, default=defaults.batch_size,
                      help='global batch (rounded up to a multiple of the device count)')
  parser.add_argument('--data_dir', default='', help='TFDS data_dir (nothing is downloaded)')
  parser.add_argument('--max_examples', type=int, default=0, help='per split; 0 = all')
  parser.add_argument('--tokenizer', default='',
                      help="clip_bpe or a SentencePiece .model; default: the run's tokenizer")
  parser.add_argument('--out', default='', help='where results go (default: --workdir, else .)')
  parser.add_argument('--cache_dir', default='',
                      help='zero-shot classifier cache (default: <out>/eval_cache)')
  args = parser.parse_args(argv)
  tasks = [t.strip() for t in args.task.split(',') if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    parser.error(f'--task: unknown {unknown or args.task!r}; expected {", ".join(TASKS)}')
  args.tasks = tasks
  return args


def main(argv: list[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  mesh = make_mesh()
  loaded = load_for_evaluation(mesh, workdir=args.workdir, weights=args.source,
                               tokenizer=args.tokenizer)
  eval_config = get_config().eval
  eval_config.update(
      batch_size=fit_batch_size(args.batch_size, mesh), split=args.split,
      train_split=args.train_split, templates=args.templates, classnames=args.classnames,
      data_dir=args.data_dir, max_examples=args.max_examples)
  for task in args.tasks:
    eval_config[task] = args.dataset
  out = storage.resolve(args.out or args.workdir or '.')
  # A fixed model evaluated again (other datasets, other splits) reuses its classifiers.
  eval_config.cache_dir = str(storage.resolve(args.cache_dir) if args.cache_dir
                              else out / 'eval_cache')
  print(f'evaluating {args.workdir or args.source} ({loaded.config.name}) on '
        f'{args.dataset}: {", ".join(args.tasks)}, {mesh.size} device(s)')
  # The linear probe alone reads no text: it runs without a tokenizer.
  tokenizer = loaded.tokenizer if set(args.tasks) & {'zeroshot', 'retrieval'} else None
  return run_evaluations(eval_config, loaded.module, loaded.variables, mesh, tokenizer,
                         workdir=out)


if __name__ == '__main__':
  try:
    main()
  except (ValueError, OSError) as error:
    sys.exit(f'error: {error}')
