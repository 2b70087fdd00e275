r"""Write TFRecord shards from a CSV/TSV or JSON-lines list of images and captions.

  python -m clip_jax.data.write_shards --input pairs.csv --output shards/ --num_shards 8 \
      [--image_size 256] [--image_column filepath] [--caption_column title]

The CSV/TSV needs a header (open_clip's `filepath` and `title` columns by default);
a JSON-lines file has one object per line with the same keys (the caption may be a
list of captions). Relative image paths are looked up next to the input file first,
then from the current directory. Bad inputs (missing file, undecodable image, empty
caption, bad label) are not written; each is printed with its path and the reason.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Any, Iterator

from PIL import Image

from clip_jax import storage
from clip_jax.data.shards import write_tfrecord_shards


def _rows(path: str, separator: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, row dict) of a CSV/TSV with a header, or of a JSON-lines file."""
  with storage.open(path, 'rb') as raw, io.TextIOWrapper(raw, encoding='utf-8',
                                                         newline='') as f:
    if path.endswith(('.jsonl', '.json')):
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            yield number, json.loads(line)
          except json.JSONDecodeError as error:
            raise ValueError(f'{path}:{number}: not valid JSON ({error})') from error
      return
    delimiter = separator or ('\t' if path.endswith('.tsv') else ',')
    for number, row in enumerate(csv.DictReader(f, delimiter=delimiter), 2):
      yield number, row


def _resolve(image_path: str, input_path: str) -> str:
  """A relative image path is looked up beside the input file first, then in the cwd."""
  if not storage.is_url(image_path) and not image_path.startswith(('/', '~')):
    beside_input = storage.resolve(input_path).parent / image_path
    if beside_input.exists():
      return str(beside_input)
  return str(storage.resolve(image_path))


def good_records(input_path: str, image_column: str, caption_column: str, label_column: str,
                 separator: str | None, bad: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
  """Records of the inputs that can be written; appends (path, reason) of the others to `bad`."""
  header_checked = False
  for number, row in _rows(input_path, separator):
    if not header_checked:
      missing = [c for c in (image_column, caption_column, label_column) if c and c not in row]
      if missing:
        raise ValueError(f'{input_path}: no column {", ".join(map(repr, missing))}; found '
                         f'{", ".join(map(repr, row))} (choose with --image_column / '
                         '--caption_column / --label_column)')
      header_checked = True
    image_path = str(row.get(image_column) or '')
    where = image_path or f'{input_path}:{number}'
    if not image_path:
      bad.append((where, 'no image path'))
      continue
    path = _resolve(image_path, input_path)
    captions = row.get(caption_column)
    captions = [captions] if isinstance(captions, str) or captions is None else list(captions)
    captions = [str(c).strip() for c in captions if c is not None and str(c).strip()]
    if not captions:
      bad.append((where, 'empty caption'))
      continue
    label = None
    if label_column:
      try:
        label = int(row[label_column])
      except (TypeError, ValueError):
        bad.append((where, f'label {row[label_column]!r} is not an integer'))
        continue
    if not storage.exists(path):
      bad.append((where, 'missing file'))
      continue
    data = storage.read_bytes(path)
    try:
      with Image.open(io.BytesIO(data)) as image:
        image.load()
    except Exception as error:  # pylint: disable=broad-except  (PIL raises many kinds)
      bad.append((where, f'undecodable image ({type(error).__name__}: {error})'))
      continue
    yield dict(image=data, caption=captions, label=label, key=image_path)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.data.write_shards',
                                   description=__doc__.split('\n\n')[0].strip())
  parser.add_argument('--input', required=True, help='CSV/TSV with a header, or .jsonl')
  parser.add_argument('--output', required=True, help='output directory (local or gs://)')
  parser.add_argument('--num_shards', type=int, required=True)
  parser.add_argument('--image_size', type=int, default=0,
                      help='downscale so the shorter side is at most this (0: keep bytes)')
  parser.add_argument('--image_column', default='filepath')
  parser.add_argument('--caption_column', default='title')
  parser.add_argument('--label_column', default='', help='optional integer label column')
  parser.add_argument('--separator', default=None, help='CSV separator (default: by extension)')
  parser.add_argument('--prefix', default='shard', help='shard file name prefix')
  args = parser.parse_args(argv)
  if not storage.is_file(args.input):
    parser.error(f'--input: {args.input} does not exist')
  bad: list[tuple[str, str]] = []
  written = [0]

  def counted(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for record in records:
      written[0] += 1
      yield record

  try:
    paths = write_tfrecord_shards(
        counted(good_records(args.input, args.image_column, args.caption_column,
                             args.label_column, args.separator, bad)),
        args.output, args.num_shards, prefix=args.prefix, image_size=args.image_size or None)
  except (ValueError, OSError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'wrote {written[0]} records to {len(paths)} shards: {paths[0]} ... {paths[-1]}')
  print(f'skipped {len(bad)} bad input(s)' + (':' if bad else ''))
  for path, reason in bad:
    print(f'  {path}: {reason}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
