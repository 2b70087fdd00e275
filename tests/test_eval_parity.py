"""Zero-shot parity with open_clip: a random-init open_clip ViT imported into clip_jax gives
the same classifier and the same predictions as open_clip's own zero-shot code, on an
image folder made here, with the same templates."""

import numpy as np
import pytest

import open_clip     # the torch extra (pip install -e '.[test,torch]')
import torch
from PIL import Image

from clip_jax.convert import import_state_dict
from clip_jax.data.tokenizers import ClipBpeTokenizer
from clip_jax.evaluate.datasets import image_folder, list_images
from clip_jax.evaluate.run import evaluate_zeroshot, image_features, text_encoder
from clip_jax.evaluate.templates import TEMPLATE_SETS
from clip_jax.evaluate.zeroshot import topk_predictions, zeroshot_classifier, zeroshot_logits
from clip_jax.models import build_model
from clip_jax.sharding import make_mesh

pytestmark = pytest.mark.torch

CONTEXT = 16
# The folder's classes first, in its (sorted) label order; two more that no image shows.
CLASSNAMES = ['blue', 'green', 'red', 'yellow square', 'dog', 'purple thing']


def _folder(root):
  rng = np.random.default_rng(0)
  colours = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (20, 40, 230),
             'yellow_square': (230, 220, 30)}
  for name, colour in colours.items():
    (root / name).mkdir()
    for i in range(5):
      w, h = int(rng.integers(32, 60)), int(rng.integers(32, 60))
      base = np.array(colour) * rng.uniform(0.3, 1.0)
      pixels = np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f'{i}.png')


def test_zeroshot_predictions_match_open_clip(tmp_path):
  torch.manual_seed(0)
  reference = open_clip.model.CLIP(
      embed_dim=64, quick_gelu=True,
      vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8,
                                               image_size=32),
      text_cfg=open_clip.model.CLIPTextCfg(context_length=CONTEXT, vocab_size=49408, width=128,
                                           heads=2, layers=2)).eval()
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  imported = import_state_dict(state, source='random-init open_clip')
  # OpenAI/open_clip models read text features at the argmax token (EOT has the largest id).
  assert imported.config.text_pool == 'argmax'
  model, variables = build_model(imported.config), imported.variables
  mesh = make_mesh()
  root = tmp_path / 'pics'
  root.mkdir()
  _folder(root)
  templates = TEMPLATE_SETS['cifar10'][:7]

  # open_clip: its tokenizer, its eval transform, its zero-shot classifier builder.
  tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
  preprocess = open_clip.transform.image_transform(32, is_train=False)
  files = list_images(str(root))
  with torch.no_grad():
    weights = open_clip.zero_shot_classifier.build_zero_shot_classifier(
        reference, tokenizer, CLASSNAMES, templates, num_classes_per_batch=4)
    pixels = torch.stack([preprocess(Image.open(root / f)) for f in files])
    their_logits = (reference.encode_image(pixels, normalize=True) @ weights).numpy()

  # clip_jax: our BPE tokenizer, our image folder reader, our classifier, on 8 devices.
  ours_tokenizer = ClipBpeTokenizer(context_length=CONTEXT)
  np.testing.assert_array_equal(ours_tokenizer(['a photo of a dog.']),
                                tokenizer(['a photo of a dog.']).numpy())
  classifier = zeroshot_classifier(text_encoder(model, variables, mesh, 16), ours_tokenizer,
                                   CLASSNAMES, templates, batch_size=16)
  np.testing.assert_allclose(classifier, weights.numpy().T, atol=2e-5)
  data = image_folder(str(root), 32)
  feats = image_features(data, model, variables, mesh, 16)
  assert [files[i] for i in feats['index']] == files
  our_logits = zeroshot_logits(feats['features'], classifier)
  np.testing.assert_allclose(our_logits, their_logits, atol=2e-5)
  # Exactly the same predictions, and not a degenerate case where every image gets one class.
  their_top = np.argsort(-their_logits, axis=-1, kind='stable')[:, :5]
  np.testing.assert_array_equal(topk_predictions(our_logits, 5), their_top)
  assert len(set(their_top[:, 0].tolist())) > 1
  margins = np.sort(their_logits, axis=-1)
  assert np.min(margins[:, -1] - margins[:, -2]) > 1e-4    # predictions not decided by noise

  labels = np.array([CLASSNAMES.index(f.split('/')[0].replace('_', ' ')) for f in files])
  np.testing.assert_array_equal(feats['label'], labels)
  their_top1 = 100.0 * np.mean(their_top[:, 0] == labels)
  metrics = evaluate_zeroshot(data, model, variables, mesh, ours_tokenizer, batch_size=16,
                              templates=templates, classnames=CLASSNAMES)
  assert metrics['top1'] == pytest.approx(their_top1)
