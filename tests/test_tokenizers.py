"""Tokenizers: CLIP BPE id-for-id against open_clip, SentencePiece training and ids."""

import importlib.util
import os
import random
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from clip_jax.config import get_config
from clip_jax.data import tokenizers
from clip_jax.models import ARCHITECTURES, model_config

_WORDS = ['a', 'photo', 'of', 'the', 'cat', 'dog', 'on', 'sofa', 'Running', 'MAN', "don't",
          "it's", "we're", "they'll", 'e-mail', 'state-of-the-art', 'U.S.A.', '2021', '3.14',
          '1,000,000', '#hashtag', '@user', 'http://example.com/a?b=c&d=e', 'C++', '$9.99',
          '50%', 'x86_64', 'café', 'naïve', 'Ünïcödé', 'straße', 'İstanbul', 'Ωmega', 'Привет',
          'мир', 'こんにちは', '東京タワー', '北京', '한국어', 'مرحبا', 'שלום', 'हिन्दी', 'ไทย',
          '😀', '👍🏽', '👨\u200d👩\u200d👧', '🇫🇷', '❤️', '✔', '™', '…', '—', '“quoted”',
          '‘single’', '&amp;', '&lt;b&gt;', '&quot;hi&quot;', '&#39;', '&#x2019;', '&amp;amp;',
          '&nbsp;', '&hellip;', 'sÃ³', 'Ã©tÃ©', 'ﬂuﬀy', 'ＦＵＬＬ', 'ｗｉｄｔｈ', 'e\u0301', '\x00',
          '\x1b[31mred\x1b[0m', '\u200b', '\ufeffbom', '\t', '\n', '\r\n', '  ', '<start_of_text>',
          '<end_of_text>', '<|endoftext|>', '<->', '>>>', '...', '!!!', '???', '(paren)', '[x]',
          '{y}', "'s", "'LL", 'O\'Neil', '<b>bold</b>', 'a&b', '&', '#1', '²', '½', '٣', '१२']


def _varied_strings(count: int, seed: int = 0) -> list[str]:
  """Captions mixing ASCII, numbers, many scripts, emoji, HTML entities, mojibake, control
  characters; a few very long ones, empty and whitespace-only ones."""
  rng = random.Random(seed)
  texts = ['', ' ', '\n\t', 'a', 'A', '<start_of_text>', 'hello world']
  while len(texts) < count:
    length = 150 if len(texts) % 64 == 0 else rng.choice([1, 2, 3, 5, 8, 12, 20, 40])
    words = [rng.choice(_WORDS) for _ in range(length)]
    separator = rng.choice([' ', ' ', ' ', '', '  ', ', '])
    text = separator.join(words)
    if rng.random() < 0.1:
      text = ''.join(rng.choice([chr(rng.randrange(32, 0x3000)), ' ']) for _ in range(30))
    if rng.random() < 0.1:
      text = text.upper()
    texts.append(text)
  return texts


@pytest.fixture(scope='module')
def clip_bpe():
  return tokenizers.ClipBpeTokenizer()


def _open_clip_tokenizer_module():
  """open_clip's tokenizer.py loaded on its own: importing the open_clip package would
  also load every model module (10 s more on a busy CPU)."""
  spec = importlib.util.find_spec('open_clip')
  path = os.path.join(spec.submodule_search_locations[0], 'tokenizer.py')
  module_spec = importlib.util.spec_from_file_location('open_clip_tokenizer_reference', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def test_clip_bpe_matches_open_clip_on_5000_strings(clip_bpe):
  oc_tokenizer = _open_clip_tokenizer_module()
  texts = _varied_strings(5000)
  assert sum(len(t) > 500 for t in texts) >= 60    # very long texts are truncated
  assert sum(not t.isascii() for t in texts) > 1000
  reference = oc_tokenizer.SimpleTokenizer()
  ours = clip_bpe(texts)
  expected = reference(texts, context_length=77).numpy()
  assert ours.dtype == np.int32 and ours.shape == (5000, 77)
  mismatch = [t for t, a, b in zip(texts, ours, expected) if not np.array_equal(a, b)]
  assert not mismatch, f'{len(mismatch)} mismatches, e.g. {mismatch[:3]!r}'
  # Full (untruncated) ids and the decoder agree too.
  for text in texts[:300]:
    assert clip_bpe.encode(text) == reference.encode(text)
    assert clip_bpe.decode(clip_bpe(text)[0]) == reference.decode(
        [i for i in expected[texts.index(text)] if i not in (0, 49406, 49407)]).strip()


def test_clip_bpe_ids_truncation_and_cache(clip_bpe):
  assert (clip_bpe.vocab_size, clip_bpe.sot_token_id, clip_bpe.eot_token_id) == (49408, 49406, 49407)
  row = clip_bpe('a photo of a cat.')[0]
  # OpenAI's ids for this caption (from the original CLIP repository's tokenizer).
  np.testing.assert_array_equal(row[:8], [49406, 320, 1125, 539, 320, 2368, 269, 49407])
  assert not row[8:].any()
  short = tokenizers.ClipBpeTokenizer(context_length=5)
  ids = short(['one two three four five six', 'one'])
  np.testing.assert_array_equal(ids[0], [49406, 637, 1237, 2097, 49407])
  np.testing.assert_array_equal(ids[1], [49406, 637, 49407, 0, 0])
  # The word cache is bounded: clearing it changes no id.
  tiny_cache = tokenizers.ClipBpeTokenizer(max_cache_size=3)
  texts = _varied_strings(200, seed=1)
  np.testing.assert_array_equal(tiny_cache(texts), clip_bpe(texts))
  assert len(tiny_cache._cache) <= 3
  # Bytes and numpy arrays of bytes (what tf.numpy_function passes) work the same.
  np.testing.assert_array_equal(clip_bpe(np.array([b'a photo of a cat.'])), clip_bpe(['a photo of a cat.']))


def test_clip_bpe_vocab_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.data.tokenizer.vocab_path'):
    tokenizers.ClipBpeTokenizer(vocab_path=str(tmp_path / 'missing.txt.gz'))
  path = tokenizers.find_clip_bpe_vocab()
  assert path.endswith(tokenizers.CLIP_BPE_FILENAME)
  assert tokenizers.ClipBpeTokenizer(vocab_path=path).vocab_size == 49408
  with pytest.raises(ValueError, match='context_length'):
    tokenizers.ClipBpeTokenizer(context_length=1)


def test_tokenizers_import_without_tensorflow_or_torch():
  code = ('import sys; import clip_jax.data.tokenizers as t; import clip_jax.data.delivery; '
          'import clip_jax.data; t.ClipBpeTokenizer()(["x"]); '
          'assert "tensorflow" not in sys.modules and "torch" not in sys.modules, "imported"')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': repo}, timeout=120, check=False)
  assert result.returncode == 0, result.stderr


def _caption_corpus(count: int) -> list[str]:
  rng = random.Random(0)
  animals = ['cat', 'dog', 'bird', 'horse', 'fish', 'frog', 'deer', 'truck', 'ship', 'plane']
  colours = ['red', 'green', 'blue', 'yellow', 'black', 'white', 'striped', 'spotted']
  places = ['on a sofa', 'in the park', 'near the sea', 'under a tree', 'in a city street']
  return [f'a {rng.choice(colours)} {rng.choice(animals)} {rng.choice(places)}'
          for _ in range(count)]


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp('spm') / 'captions')
  return tokenizers.train_sentencepiece(_caption_corpus(400), prefix, vocab_size=512)


def test_sentencepiece_ids_and_round_trip(sentencepiece_model):
  tok = tokenizers.SentencePieceTokenizer(sentencepiece_model, context_length=16)
  assert (tok.sot_token_id, tok.eot_token_id) == (2, 3)
  assert 20 < tok.vocab_size <= 512    # hard_vocab_limit=False: small corpus, smaller vocab
  ids = tok(['A red cat on a sofa', 'a blue dog in the park ' * 10, ''])
  assert ids.dtype == np.int32 and ids.shape == (3, 16)
  assert ids[0, 0] == 2 and 3 in ids[0] and ids.max() < tok.vocab_size
  end = list(ids[0]).index(3)
  assert not ids[0, end + 1:].any()                       # padded with 0
  assert tok.decode(ids[0]) == 'a red cat on a sofa'      # lower-cased (nmt_nfkc_cf)
  assert ids[1, -1] == 3 and (ids[1] != 0).all()          # truncated, ends with eot
  np.testing.assert_array_equal(ids[2, :3], [2, 3, 0])
  # Unknown characters map to unk (1).
  assert 1 in tok(['漢字'])[0]


def test_get_tokenizer_from_config_section(sentencepiece_model):
  section = ml_collections.ConfigDict(dict(type='sentencepiece', vocab_path='',
                                           model_path=sentencepiece_model, context_length=16))
  tok = tokenizers.get_tokenizer(section)
  assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.context_length == 16
  section.type = 'clip_bpe'
  section.context_length = 77
  assert tokenizers.get_tokenizer(section).eot_token_id == 49407
  section.type = 'wordpiece'
  with pytest.raises(ValueError, match='config.data.tokenizer.type'):
    tokenizers.get_tokenizer(section)
  section.type = 'sentencepiece'
  section.model_path = ''
  with pytest.raises(ValueError, match='config.data.tokenizer.model_path'):
    tokenizers.get_tokenizer(section)
  with pytest.raises(ValueError, match='no non-empty caption'):
    tokenizers.train_sentencepiece(['', '  '], '/tmp/unused_spm_prefix', 64)


def test_tokenizer_for_is_the_one_rule(sentencepiece_model, tmp_path):
  openai_sized, tiny = model_config('ViT-B/32'), model_config('tiny')
  # The vocabulary decides when nothing else does, and the training config follows it.
  assert tokenizers.default_tokenizer_type(openai_sized) == 'clip_bpe'
  assert tokenizers.default_tokenizer_type(tiny) == 'sentencepiece'
  for name in ARCHITECTURES:
    config = get_config(name)
    assert config.data.tokenizer.type == tokenizers.default_tokenizer_type(config.model)
  bpe = tokenizers.tokenizer_for(openai_sized)
  assert isinstance(bpe, tokenizers.ClipBpeTokenizer) and bpe.context_length == 77
  assert tokenizers.tokenizer_for(tiny) is None
  # A run's section wins over the vocabulary, unless its SentencePiece model was never set.
  section = get_config('tiny').data.tokenizer
  assert tokenizers.tokenizer_for(tiny, section) is None
  section.model_path = sentencepiece_model
  assert isinstance(tokenizers.tokenizer_for(tiny, section), tokenizers.SentencePieceTokenizer)
  # The flag wins over both, at the model's context length.
  flagged = tokenizers.tokenizer_for(tiny, section, 'clip_bpe')
  assert isinstance(flagged, tokenizers.ClipBpeTokenizer) and flagged.context_length == 16
  spm = tokenizers.tokenizer_for(openai_sized, None, sentencepiece_model)
  assert isinstance(spm, tokenizers.SentencePieceTokenizer) and spm.context_length == 77
  with pytest.raises(FileNotFoundError, match='--tokenizer'):
    tokenizers.tokenizer_for(tiny, None, str(tmp_path / 'missing.model'))
