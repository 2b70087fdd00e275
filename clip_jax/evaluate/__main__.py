"""python -m clip_jax.evaluate: zero-shot classification, retrieval or a linear probe.

  python -m clip_jax.evaluate --workdir=runs/tiny --task=zeroshot --dataset=builtin
  python -m clip_jax.evaluate --source=ViT-B-32.pt --task=zeroshot \\
      --dataset=tfds:cifar10 --data_dir=~/tensorflow_datasets
  python -m clip_jax.evaluate --source=runs/b32 --task=retrieval --dataset=folder:coco_val
  python -m clip_jax.evaluate --workdir=runs/tiny --task=linear_probe --dataset=folder:pets
  python -m clip_jax.evaluate --source=runs/b32 --task=zeroshot --dataset=wds:ROOT/wds_cars_test
  python -m clip_jax.evaluate --workdir=runs/b32 --suite=datacomp --data_root=ROOT

Prints a Markdown table and writes eval_results.json (and a line of eval_results.jsonl)
to --out (default: the workdir, else the current directory). A suite appends one line
per task to <out>/<suite>_results.jsonl as each finishes, and resumes from it.
"""

from __future__ import annotations

import argparse
import sys

import jax

from clip_jax import distributed, storage
from clip_jax.config import get_config
from clip_jax.evaluate.features import fit_batch_size
from clip_jax.evaluate.loading import load_for_evaluation
from clip_jax.evaluate.run import TASKS, run_evaluations
from clip_jax.evaluate.suite import SUITES, run_suite
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
  parser.add_argument('--task', default='',
                      help=f'one or more of {", ".join(TASKS)}, comma-separated')
  parser.add_argument('--dataset', default='',
                      help='builtin, builtin_seen, builtin_captions (clip_jax.evaluate.datasets), '
                           'folder:PATH (or a directory), tfds:NAME, shards:GLOB or wds:ROOT '
                           "(clip_benchmark's webdataset layout); comma-separated for several")
  parser.add_argument('--suite', default='', choices=('',) + SUITES,
                      help='a benchmark suite instead of --task/--dataset: every task of it '
                           'whose data is under --data_root (clip_jax.evaluate.suite)')
  parser.add_argument('--data_root', default='',
                      help='--suite: the folder (or gs:// prefix) holding its '
                           'wds_<task>_test folders')
  parser.add_argument('--require_all', action='store_true',
                      help='--suite: fail unless every task it can score has its data')
  parser.add_argument('--dtype', default='', choices=('', 'float32', 'bfloat16'),
                      help="compute dtype of the features on the mesh (default: the model's "
                           'own); parameters stay as stored')
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
  if args.suite:
    if args.task or args.dataset:
      parser.error('--suite runs its own tasks and datasets; drop --task and --dataset')
    if not args.data_root:
      parser.error('--suite needs --data_root (the folder of its wds_<task>_test folders)')
    args.tasks = []
    return args
  if args.data_root or args.require_all:
    parser.error('--data_root and --require_all go with --suite')
  if not args.dataset:
    parser.error('--dataset is required (or --suite)')
  tasks = [t.strip() for t in args.task.split(',') if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    parser.error(f'--task: unknown {unknown or args.task!r}; expected {", ".join(TASKS)}')
  args.tasks = tasks
  return args


def main(argv: list[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  # Several processes (a TPU slice: the same command on every worker) meet first, so the
  # mesh spans all their devices and each host reads its part of every global batch.
  distributed.initialize()
  mesh = make_mesh()
  loaded = load_for_evaluation(mesh, workdir=args.workdir, weights=args.source,
                               tokenizer=args.tokenizer,
                               **({'dtype': args.dtype} if args.dtype else {}))
  out = storage.resolve(args.out or args.workdir or '.')
  # A fixed model evaluated again (other datasets, other splits) reuses its classifiers.
  cache_dir = str(storage.resolve(args.cache_dir) if args.cache_dir else out / 'eval_cache')
  batch_size = fit_batch_size(args.batch_size, mesh)
  if args.suite:
    print(f'evaluating {args.workdir or args.source} ({loaded.config.name}, '
          f'{loaded.config.dtype}) on the {args.suite} suite under {args.data_root}, '
          f'{mesh.size} device(s) on {jax.process_count()} host(s)')
    return run_suite(args.suite, storage.resolve(args.data_root), loaded.module,
                     loaded.variables, mesh, loaded.tokenizer, out=out, batch_size=batch_size,
                     cache_dir=cache_dir, require_all=args.require_all,
                     max_examples=args.max_examples)
  eval_config = get_config().eval
  eval_config.update(
      batch_size=batch_size, split=args.split, train_split=args.train_split,
      templates=args.templates, classnames=args.classnames, data_dir=args.data_dir,
      max_examples=args.max_examples, cache_dir=cache_dir)
  for task in args.tasks:
    eval_config[task] = args.dataset
  print(f'evaluating {args.workdir or args.source} ({loaded.config.name}) on '
        f'{args.dataset}: {", ".join(args.tasks)}, {mesh.size} device(s) on '
        f'{jax.process_count()} host(s)')
  # The linear probe alone reads no text: it runs without a tokenizer.
  tokenizer = loaded.tokenizer if set(args.tasks) & {'zeroshot', 'retrieval'} else None
  return run_evaluations(eval_config, loaded.module, loaded.variables, mesh, tokenizer,
                         workdir=out)


if __name__ == '__main__':
  try:
    main()
  except (ValueError, OSError, distributed.ClusterError) as error:
    sys.exit(f'error: {error}')
