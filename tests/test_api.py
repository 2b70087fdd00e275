"""clip_jax.load: the public entry point."""

import jax
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


def test_one_handle_from_load_and_for_evaluation(tmp_path):
  """clip_jax.load and the evaluate/embed loader give the same handle and the features the
  module rebuilt from the stored config (what evaluation computed before) gives."""
  from clip_jax.checkpoint import load_model, save_model
  from clip_jax.config import get_config
  from clip_jax.data.tokenizers import ClipBpeTokenizer
  from clip_jax.evaluate.loading import load_for_evaluation
  from clip_jax.models import build_model
  from clip_jax.models.architectures import CLIP_MEAN, CLIP_STD
  from clip_jax.models.clip import CLIP
  from clip_jax.sharding import make_mesh

  workdir = str(tmp_path / 'run')
  save_model(workdir, get_config('tiny'), clip_jax.load('tiny', seed=5).variables)
  pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((3, 16), np.int32)
  tokens[:, 0], tokens[:, 1], tokens[:, 2] = 2, 9, 3
  experiment, variables = load_model(workdir)
  module = build_model(experiment.model)
  want_image = module.apply(variables, pixels, method=CLIP.encode_image)
  want_text = module.apply(variables, tokens, method=CLIP.encode_text)

  mesh = make_mesh()
  handles = [clip_jax.load(workdir), load_for_evaluation(mesh, workdir=workdir),
             load_for_evaluation(mesh, weights=workdir)]
  for model in handles:
    assert isinstance(model, clip_jax.ClipModel)
    assert model.experiment.model.name == model.config.name == 'tiny'
    np.testing.assert_allclose(model.encode_image(pixels), want_image, atol=1e-6)
    np.testing.assert_allclose(model.encode_text(tokens), want_text, atol=1e-6)
    # The preprocessing it carries is the one the pipelines normalise with.
    assert (model.image_size, model.image_mean, model.image_std) == (32, CLIP_MEAN, CLIP_STD)
  for model in handles[1:]:
    for leaf in jax.tree_util.tree_leaves(model.variables):
      assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size
  # The tiny run names no SentencePiece model: no tokenizer unless one is given.
  with pytest.raises(ValueError, match='--tokenizer: this model has no known tokenizer'):
    handles[0].tokenizer  # pylint: disable=pointless-statement
  for model in (load_for_evaluation(mesh, workdir=workdir, tokenizer='clip_bpe'),
                clip_jax.load('tiny', tokenizer='clip_bpe')):
    assert isinstance(model.tokenizer, ClipBpeTokenizer) and model.tokenizer.context_length == 16
  with pytest.raises(ValueError, match='exactly one of'):
    load_for_evaluation(mesh)
