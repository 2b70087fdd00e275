"""Text tokenizers: OpenAI's CLIP BPE (id-for-id) and SentencePiece. No tensorflow here.

Every tokenizer is a callable `tokenizer(texts) -> int32 [N, context_length]` with
`vocab_size`, `context_length`, `sot_token_id` and `eot_token_id`. A row is
`[sot, ids..., eot, 0, 0, ...]`; a text too long keeps its first ids and ends with
`eot` (OpenAI's truncation), so the end-of-text token is always present.

The CLIP BPE follows OpenAI's `simple_tokenizer` as open_clip ships it: ftfy and
double HTML unescape, whitespace collapsing, lower-casing, the same regex, byte-level
BPE with `</w>`, start 49406 / end 49407. (OpenAI's original regex spells its special
tokens `<|startoftext|>` inside an unescaped alternation, which splits `<` and `>`
off neighbouring punctuation; open_clip's corrected pattern is the one matched here.)
Speed comes from two shortcuts that change no id: plain printable ASCII without `&`
skips ftfy and HTML unescaping (both are the identity on such text), and each word's
ids are cached (bounded; the cache is cleared when full).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re as std_re
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from clip_jax import storage
from clip_jax.models import openai_constants as openai

CLIP_BPE_FILENAME = 'bpe_simple_vocab_16e6.txt.gz'
# Packages that ship OpenAI's merges file next to their code.
_VOCAB_PACKAGES = ('open_clip', 'clip')
_SPECIAL_TOKENS = ('<start_of_text>', '<end_of_text>')
# Merges OpenAI keeps (lines 1 .. 48894 of the file): with the 512 byte tokens and the
# two special tokens they make the vocabulary, the special tokens its last two ids.
_NUM_MERGES = openai.VOCAB_SIZE - 2 * 256 - len(_SPECIAL_TOKENS)
# Plain printable ASCII (plus tab/newline/CR) with no '&': ftfy.fix_text and
# html.unescape leave such text unchanged, so it can skip them.
_NEEDS_FULL_CLEAN = std_re.compile(r'[^\x20-\x25\x27-\x7e\t\n\r]')


def _byte_to_unicode() -> dict[int, str]:
  """OpenAI's reversible byte -> printable character table used before BPE.

  Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
  soft hyphen...) map to code points 256, 257, ... in byte order.
  """
  printable = set(range(ord('!'), ord('~') + 1)) | set(range(ord('¡'), ord('¬') + 1)) | set(
      range(ord('®'), ord('ÿ') + 1))
  table = {b: chr(b) for b in sorted(printable)}
  next_code = 256
  for b in range(256):
    if b not in printable:
      table[b] = chr(next_code)
      next_code += 1
  return table


def find_clip_bpe_vocab(vocab_path: str | None = None) -> str:
  """The merges file: `vocab_path` if given, else the copy an installed package ships.

  Packages are located with importlib without importing them (no torch import).
  """
  if vocab_path:
    if not storage.is_file(vocab_path):
      raise FileNotFoundError(f'config.data.tokenizer.vocab_path: {vocab_path!r} does not exist; '
                              f'expected OpenAI\'s {CLIP_BPE_FILENAME}')
    return str(storage.resolve(vocab_path))
  for package in _VOCAB_PACKAGES:
    try:
      spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
      spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
      candidate = os.path.join(folder, CLIP_BPE_FILENAME)
      if os.path.exists(candidate):
        return candidate
  raise FileNotFoundError(
      f'CLIP BPE vocabulary {CLIP_BPE_FILENAME} not found in an installed package '
      f'({", ".join(_VOCAB_PACKAGES)}); install open_clip_torch or set '
      'config.data.tokenizer.vocab_path to the file')


@functools.lru_cache(maxsize=4)
def _load_clip_bpe(vocab_path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
  """(token -> id, merge pair -> rank) from OpenAI's gzip merges file (read once)."""
  lines = gzip.decompress(storage.read_bytes(vocab_path)).decode('utf-8').split('\n')
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f'{vocab_path}: expected {_NUM_MERGES} BPE merges after a header line, '
                     'as in OpenAI\'s bpe_simple_vocab_16e6.txt.gz')
  byte_chars = list(_byte_to_unicode().values())
  tokens = byte_chars + [c + '</w>' for c in byte_chars] + [a + b for a, b in merges]
  tokens += list(_SPECIAL_TOKENS)
  encoder = {token: i for i, token in enumerate(tokens)}
  ranks = {pair: i for i, pair in enumerate(merges)}
  return encoder, ranks


def _pad_rows(rows: Sequence[Sequence[int]], context_length: int, eot_token_id: int) -> np.ndarray:
  """Rows of ids -> int32 [N, context_length]; too-long rows keep eot as their last id."""
  out = np.zeros((len(rows), context_length), np.int32)
  for i, ids in enumerate(rows):
    if len(ids) > context_length:
      out[i] = ids[:context_length]
      out[i, -1] = eot_token_id
    else:
      out[i, :len(ids)] = ids
  return out


def _as_text_list(texts: str | Iterable[Any]) -> list[str]:
  """A list of str from a str, a sequence of str/bytes or a numpy array of them."""
  if isinstance(texts, (str, bytes)):
    texts = [texts]
  return [t.decode('utf-8', errors='replace') if isinstance(t, bytes) else str(t) for t in texts]


class ClipBpeTokenizer:
  """OpenAI's CLIP byte-level BPE: 49408 ids, start 49406, end 49407."""

  def __init__(self, vocab_path: str | None = None, context_length: int = openai.CONTEXT_LENGTH,
               max_cache_size: int = 1_000_000):
    import regex  # pylint: disable=import-outside-toplevel  (Unicode classes \p{L}, \p{N})
    if context_length < 2:
      raise ValueError(f'config.data.tokenizer.context_length: expected >= 2 (start and end '
                       f'tokens), got {context_length}')
    self.vocab_path = find_clip_bpe_vocab(vocab_path)
    self._encoder, self._ranks = _load_clip_bpe(self.vocab_path)
    self._decoder = {i: t for t, i in self._encoder.items()}
    self._byte_encoder = _byte_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self.context_length = int(context_length)
    self.vocab_size = len(self._encoder)
    self.sot_token_id = self._encoder[_SPECIAL_TOKENS[0]]
    self.eot_token_id = self._encoder[_SPECIAL_TOKENS[1]]
    specials = '|'.join(_SPECIAL_TOKENS)
    self._word_pattern = regex.compile(
        specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)
    self._max_cache_size = max_cache_size
    self._cache: dict[str, tuple[int, ...]] = {}
    self._cache_lock = threading.Lock()   # tf.data calls the tokenizer from its threads

  def _words(self, text: str) -> list[str]:
    """Cleaned text split into cache keys whose ids, concatenated, are the text's ids.

    No regex match spans a space, so for plain ASCII text the space-separated chunks
    can be the cache keys (the regex runs once per new chunk, not once per caption).
    Other text takes OpenAI's full path: ftfy, double HTML unescape, regex words.
    """
    if text.isascii() and not _NEEDS_FULL_CLEAN.search(text):
      return text.lower().split()
    import ftfy  # pylint: disable=import-outside-toplevel  (only non-trivial text needs it)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return self._word_pattern.findall(' '.join(text.split()).lower())

  def _merge(self, symbols: list[str]) -> list[str]:
    """Applies BPE merges to one word's symbols, lowest rank first, as OpenAI."""
    ranks = self._ranks
    while len(symbols) > 1:
      best_rank, best_pair = None, None
      for pair in zip(symbols, symbols[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best_rank, best_pair = rank, pair
      if best_pair is None:
        break
      first, second = best_pair
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
    """Ids of a chunk of cleaned text without spaces (uncached path); caches them."""
    words = self._word_pattern.findall(chunk)
    if len(words) == 1 and words[0] == chunk:
      if chunk in _SPECIAL_TOKENS:
        ids = (self._encoder[chunk],)
      else:
        chars = [self._byte_encoder[b] for b in chunk.encode('utf-8')]
        chars[-1] += '</w>'
        ids = tuple(self._encoder[s] for s in self._merge(chars))
    else:
      ids = tuple(i for word in words for i in self._cache.get(word) or self._chunk_ids(word))
    with self._cache_lock:
      if len(self._cache) >= self._max_cache_size:
        self._cache.clear()
      self._cache[chunk] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text, without start/end tokens."""
    cache, ids = self._cache, []
    for chunk in self._words(text):
      chunk_ids = cache.get(chunk)
      ids.extend(chunk_ids if chunk_ids is not None else self._chunk_ids(chunk))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids (special and padding ids dropped); `</w>` becomes a space."""
    skip = {0, self.sot_token_id, self.eot_token_id}
    chars = ''.join(self._decoder[int(i)] for i in ids if int(i) not in skip)
    data = bytearray(self._byte_decoder[c] for c in chars)
    return data.decode('utf-8', errors='replace').replace('</w>', ' ').strip()

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in _as_text_list(texts)]
    return _pad_rows(rows, self.context_length, self.eot_token_id)


class SentencePieceTokenizer:
  """A SentencePiece model as a CLIP tokenizer: `[bos] + pieces + [eos]`, pad 0."""

  def __init__(self, model_path: str, context_length: int):
    import sentencepiece  # pylint: disable=import-outside-toplevel
    if not model_path:
      raise ValueError('config.data.tokenizer.model_path: empty; expected a SentencePiece '
                       '.model file (train one with python -m clip_jax.data.train_tokenizer)')
    if not storage.is_file(model_path):
      raise FileNotFoundError(f'config.data.tokenizer.model_path: {model_path!r} does not exist')
    if context_length < 2:
      raise ValueError(f'config.data.tokenizer.context_length: expected >= 2, got {context_length}')
    self.model_path = str(storage.resolve(model_path))
    # From the bytes: the model may be on a bucket, which SentencePiece cannot open.
    self._processor = sentencepiece.SentencePieceProcessor(
        model_proto=storage.read_bytes(self.model_path))
    self.context_length = int(context_length)
    self.vocab_size = int(self._processor.get_piece_size())
    self.sot_token_id = int(self._processor.bos_id())
    self.eot_token_id = int(self._processor.eos_id())
    if self.sot_token_id < 0 or self.eot_token_id < 0:
      raise ValueError(f'{model_path}: the SentencePiece model has no bos/eos ids; train it with '
                       'bos_id and eos_id set (clip_jax.data.tokenizers.train_sentencepiece does)')

  def encode(self, text: str) -> list[int]:
    return list(self._processor.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    keep = [int(i) for i in ids if int(i) not in (0, self.sot_token_id, self.eot_token_id)]
    return self._processor.decode(keep)

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    pieces = self._processor.encode(_as_text_list(texts))
    rows = [[self.sot_token_id, *ids, self.eot_token_id] for ids in pieces]
    return _pad_rows(rows, self.context_length, self.eot_token_id)


Tokenizer = ClipBpeTokenizer | SentencePieceTokenizer
TOKENIZER_TYPES = ('clip_bpe', 'sentencepiece')


def get_tokenizer(section: Any) -> Tokenizer:
  """The tokenizer described by `config.data.tokenizer` (keys type, vocab_path, model_path,
  context_length)."""
  kind = section['type']
  if kind == 'clip_bpe':
    return ClipBpeTokenizer(section.get('vocab_path') or None, int(section['context_length']))
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(section.get('model_path', ''), int(section['context_length']))
  raise ValueError(f'config.data.tokenizer.type: unknown {kind!r}; expected one of '
                   f'{", ".join(TOKENIZER_TYPES)}')


def default_tokenizer_type(model_config: Any) -> str:
  """The tokenizer a model's text tower was made for when nothing says otherwise.

  A tower with OpenAI's vocabulary size reads CLIP BPE ids; any other vocabulary (tiny's)
  is a SentencePiece model trained on the captions.
  """
  return ('clip_bpe' if int(model_config['text']['vocab_size']) == openai.VOCAB_SIZE
          else 'sentencepiece')


def tokenizer_for(model_config: Any, section: Any = None, spec: str = '') -> Tokenizer | None:
  """The tokenizer of a model: the one rule that training defaults, evaluation and embed follow.

  `spec` (the --tokenizer flag) wins: 'clip_bpe' or a SentencePiece `.model` file. Else the
  run's `config.data.tokenizer` section, when it names a usable tokenizer. Else CLIP BPE if
  `default_tokenizer_type` says so, else None: the model cannot encode text without being
  told its tokenizer. Contexts follow the model's text tower (or the section's).
  """
  context = int(model_config['text']['context_length'])
  if spec == 'clip_bpe':
    return ClipBpeTokenizer(context_length=context)
  if spec:
    if not storage.is_file(spec):
      raise FileNotFoundError(f'--tokenizer: {spec!r} is neither clip_bpe nor an existing '
                              'SentencePiece .model file')
    return SentencePieceTokenizer(spec, context)
  # A run whose SentencePiece model was never set has no tokenizer to offer.
  if section and not (section.get('type') == 'sentencepiece' and not section.get('model_path')):
    return get_tokenizer(section)
  if default_tokenizer_type(model_config) == 'clip_bpe':
    return ClipBpeTokenizer(context_length=context)
  return None


def train_sentencepiece(captions: Iterable[str], output_prefix: storage.PathLike,
                        vocab_size: int, *, model_type: str = 'unigram',
                        lowercase: bool = True) -> str:
  """Trains a SentencePiece model on captions; returns the path of `<output_prefix>.model`.

  Ids follow the house convention (pad 0, unk 1, start 2, end 3). `hard_vocab_limit`
  is off so that a small corpus yields a smaller vocabulary instead of an error.
  """
  import sentencepiece  # pylint: disable=import-outside-toplevel
  texts = [' '.join(str(c).split()) for c in captions]
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError(f'train_sentencepiece({output_prefix!r}): no non-empty caption to train on')
  prefix = storage.resolve(output_prefix)
  # The trainer writes local files only; on a bucket they are made locally and copied up.
  with storage.local_dir(prefix.parent) as folder:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(folder, prefix.name),
        vocab_size=int(vocab_size), model_type=model_type, pad_id=0, unk_id=1, bos_id=2,
        eos_id=3, hard_vocab_limit=False, character_coverage=1.0,
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        normalization_rule_name='nmt_nfkc_cf' if lowercase else 'nmt_nfkc', minloglevel=2)
  return f'{prefix}.model'
