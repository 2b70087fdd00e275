r"""Train a SentencePiece tokenizer on captions (from shards or a text file).

  python -m clip_jax.data.train_tokenizer --input 'shards/*.tfrecord' \
      --output_prefix tokenizers/captions --vocab_size 8192
  python -m clip_jax.data.train_tokenizer --input captions.txt --output_prefix tok/c --vocab_size 512

Inputs: TFRecord or img2dataset .tar shards (any pattern config.data.train.pattern
accepts; `--source` picks the kind, by default from the file extension), or a text
file with one caption per line (`.txt`). Ids: pad 0, unk 1, start 2, end 3. Use the
result with config.data.tokenizer.type=sentencepiece and
config.data.tokenizer.model_path=<output_prefix>.model.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from typing import Iterator

from clip_jax import storage
from clip_jax.data.tokenizers import SentencePieceTokenizer, train_sentencepiece


def read_captions(input_pattern: str, source_kind: str, caption_key: str,
                  max_captions: int) -> Iterator[str]:
  """Captions from a text file (one per line) or from shards, at most `max_captions` (0: all)."""
  if source_kind == 'text':
    with storage.open(input_pattern, 'rb') as raw, io.TextIOWrapper(raw, encoding='utf-8') as f:
      yield from itertools.islice((line.rstrip('\n') for line in f), max_captions or None)
    return
  from clip_jax.data.sources import Source, iterate_captions  # pylint: disable=import-outside-toplevel
  source = Source(kind=source_kind, pattern=input_pattern, caption_key=caption_key, name='--input')
  yield from iterate_captions(source, max_captions)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.data.train_tokenizer',
                                   description=__doc__.split('\n\n')[0].strip())
  parser.add_argument('--input', required=True, help='shard pattern, or a .txt file of captions')
  parser.add_argument('--output_prefix', required=True, help='writes <prefix>.model and .vocab')
  parser.add_argument('--vocab_size', type=int, default=8192,
                      help='upper bound; a small corpus gives fewer pieces')
  parser.add_argument('--source', choices=('auto', 'text', 'tfrecord', 'wds'), default='auto')
  parser.add_argument('--caption_key', default='',
                      help="TFRecord feature or tar extension ('' = caption / txt)")
  parser.add_argument('--max_captions', type=int, default=2_000_000, help='0 = all')
  parser.add_argument('--model_type', choices=('unigram', 'bpe'), default='unigram')
  args = parser.parse_args(argv)
  kind = args.source
  if kind == 'auto':
    from clip_jax.data.sources import infer_kind  # pylint: disable=import-outside-toplevel
    kind = 'text' if args.input.endswith('.txt') else infer_kind(args.input)
  try:
    captions = list(read_captions(args.input, kind, args.caption_key, args.max_captions))
    model_path = train_sentencepiece(captions, args.output_prefix, args.vocab_size,
                                     model_type=args.model_type)
  except (ValueError, OSError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  tokenizer = SentencePieceTokenizer(model_path, context_length=77)
  print(f'trained a {args.model_type} SentencePiece model with {tokenizer.vocab_size} pieces on '
        f'{len(captions)} captions from {args.input} ({kind}); wrote {model_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
