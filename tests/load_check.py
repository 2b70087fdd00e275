"""`python tests/load_check.py TOKENIZER REFERENCE [hf=PATH | openai=PATH] ...`

Loads REFERENCE (a clip_jax workdir) and every PATH with `clip_jax.load`, as a user would,
and checks that each gives the reference's features: images and texts for Hugging Face
layouts (directories, or workdirs imported from them), the weights for OpenAI layouts
(which cannot say tiny's head count or end-of-text pooling, so they come back as the
nearest zoo layout). Prints one line per path; exits non-zero on a mismatch.
"""

import sys

import jax
import numpy as np

import clip_jax
from clip_jax.data.tokenizers import SentencePieceTokenizer


def main(tokenizer_path: str, reference_path: str, *others: str) -> None:
  reference = clip_jax.load(reference_path)
  tokenizer = SentencePieceTokenizer(tokenizer_path, reference.context_length)
  pixels = np.random.default_rng(0).normal(
      size=(2, reference.image_size, reference.image_size, 3))
  tokens = tokenizer(['a photo of a red circle.', 'a small green star'])
  image = np.asarray(reference.encode_image(pixels))
  text = np.asarray(reference.encode_text(tokens))
  size = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))  # noqa: E731
  for other in others:
    layout, path = other.split('=', 1)
    model = clip_jax.load(path)
    if layout == 'hf':
      np.testing.assert_allclose(np.asarray(model.encode_image(pixels)), image, atol=1e-5)
      np.testing.assert_allclose(np.asarray(model.encode_text(tokens)), text, atol=1e-5)
      print(f'same image and text features: {path}')
    else:
      assert size(model.params) == size(reference.params), path
      print(f'same parameters: {path}')


if __name__ == '__main__':
  main(*sys.argv[1:])
