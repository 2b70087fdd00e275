"""python -m clip_jax.embed: embeddings of a folder of images or a file of captions.

  python -m clip_jax.embed --source=ViT-B-32.pt --images=photos/ --out=photos.npy
  python -m clip_jax.embed --workdir=runs/tiny --texts=captions.txt --out=captions.npy

Writes float32 [N, embed_dim] (L2-normalised unless --no_normalize), what a retrieval
index takes, and beside it `<out>.txt` naming row i: the image's path relative to the
folder, or the caption. Images are found recursively and read in sorted path order;
unreadable images are skipped, counted and left out of both files. Text files give one
caption per non-empty line. Runs batched on all devices (and hosts) of the machine.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh

from clip_jax import storage
from clip_jax.api import ClipModel
from clip_jax.evaluate.datasets import image_files, list_images
from clip_jax.evaluate.features import (TowerEncoder, encode_arrays, extract_features,
                                        fit_batch_size)
from clip_jax.evaluate.loading import load_for_evaluation
from clip_jax.evaluate.run import read_lines
from clip_jax.sharding import make_mesh


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.embed', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument('--source', default='', help='anything clip_jax.load reads (a PyTorch or '
                     'safetensors file, an imported workdir, an architecture name)')
  model.add_argument('--workdir', default='', help='a clip_jax run (checkpoint + config.json)')
  inputs = parser.add_mutually_exclusive_group(required=True)
  inputs.add_argument('--images', default='', help='a folder of images (searched recursively)')
  inputs.add_argument('--texts', default='', help='a text file, one caption per line')
  parser.add_argument('--out', required=True, help='the .npy file to write')
  parser.add_argument('--batch_size', type=int, default=256,
                      help='global batch (rounded up to a multiple of the device count)')
  parser.add_argument('--tokenizer', default='',
                      help="clip_bpe or a SentencePiece .model; default: the run's tokenizer")
  parser.add_argument('--no_normalize', action='store_true',
                      help='write the raw (unnormalised) features')
  return parser.parse_args(argv)


def embed_images(loaded: ClipModel, folder: str, mesh: Mesh, batch_size: int,
                 normalize: bool) -> tuple[np.ndarray, list[str], list[str]]:
  """(embeddings, relative paths of the rows, unreadable files)."""
  files = list_images(folder)
  if not files:
    raise ValueError(f'--images: {folder} holds no image files')
  data = image_files(folder, files, loaded.image_size)
  out = extract_features(TowerEncoder(loaded.module, 'image'), loaded.variables,
                         data.batches(batch_size, mesh), mesh, normalize=normalize)
  return out['features'], [files[i] for i in out['index']], data.skipped


def embed_texts(loaded: ClipModel, path: str, mesh: Mesh, batch_size: int, normalize: bool
                ) -> tuple[np.ndarray, list[str]]:
  """(embeddings, the captions of the rows): one caption per non-empty line of `path`."""
  texts = read_lines(path, 'captions')
  if not texts:
    raise ValueError(f'--texts: {path} holds no non-empty line')
  encode = TowerEncoder(loaded.module, 'text')
  tokenizer = loaded.tokenizer
  chunks = [encode_arrays(encode, loaded.variables, tokenizer(texts[i:i + batch_size]),
                          mesh, batch_size, normalize=normalize)
            for i in range(0, len(texts), batch_size)]
  return np.concatenate(chunks), texts


def main(argv: list[str] | None = None) -> str:
  args = parse_args(argv)
  start = time.time()
  mesh = make_mesh()
  loaded = load_for_evaluation(mesh, workdir=args.workdir, weights=args.source,
                               tokenizer=args.tokenizer)
  normalize = not args.no_normalize
  batch_size = fit_batch_size(args.batch_size, mesh)
  skipped: list[str] = []
  if args.images:
    embeddings, names, skipped = embed_images(loaded, args.images, mesh, batch_size,
                                              normalize)
  else:
    embeddings, names = embed_texts(loaded, args.texts, mesh, batch_size, normalize)
  out = str(storage.resolve(args.out if args.out.endswith('.npy') else args.out + '.npy'))
  if jax.process_index() != 0:      # every host computed the same rows; one writes them
    return out
  buffer = io.BytesIO()
  np.save(buffer, embeddings.astype(np.float32))
  storage.write_bytes(out, buffer.getvalue())
  index = out[:-len('.npy')] + '.txt'
  storage.write_text(index, ''.join(' '.join(name.split()) + '\n' for name in names))
  for problem in skipped:
    print(f'skipped unreadable image {problem}')
  print(f'embedded {len(names)} {"images" if args.images else "texts"} '
        f'({len(skipped)} skipped) with {args.workdir or args.source} on {mesh.size} device(s) '
        f'in {time.time() - start:.1f}s: {embeddings.shape} float32 '
        f'{"L2-normalised " if normalize else ""}-> {out}, row names -> {index}')
  return out


if __name__ == '__main__':
  try:
    main()
  except (ValueError, OSError) as error:
    sys.exit(f'error: {error}')
