"""clip_jax.load: the public entry point."""

import numpy as np
import pytest

import clip_jax


def test_load_by_name_is_seeded_and_encodes():
  a = clip_jax.load('tiny', seed=1)
  b = clip_jax.load('tiny', seed=1)
  c = clip_jax.load('tiny', seed=2)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((2, 16), np.int32)
  tokens[:, 0], tokens[:, 1], tokens[:, 2] = 510, 7, 511
  fa, fb, fc = (m.encode_image(pixels) for m in (a, b, c))
  np.testing.assert_array_equal(fa, fb)
  assert not np.allclose(fa, fc)
  assert fa.shape == (2, 64)
  text = a.encode_text(tokens)
  assert text.shape == (2, 64)
  # Unnormalised, as OpenAI's encode_image / encode_text.
  assert not np.allclose(np.linalg.norm(text, axis=-1), 1.0)
  assert a.config.name == 'tiny' and 'visual' in a.params


def test_load_rejects_unknown_names_and_bad_inputs():
  with pytest.raises(ValueError, match='neither a known architecture'):
    clip_jax.load('ViT-Q/99')
  model = clip_jax.load('tiny')
  with pytest.raises(ValueError, match=r'\[N, 32, 32, 3\]'):
    model.encode_image(np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match='token ids'):
    model.encode_text(np.zeros((1, 99), np.int32))
