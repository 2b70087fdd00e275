"""PyTorch interop proven against the real libraries: open_clip and transformers.

Every architecture: a random open_clip model (weights perturbed so that no gain is
trivially 1 or 0, BatchNorm statistics random) is saved, imported, and clip_jax's
image features, text features and logits match open_clip's; export gives back the
original state dict bit for bit, and open_clip (strict=True) and transformers load
the exports with the same features. ViT-B/32 and RN50 run at full size; the other
seven keep their real widths, heads and image sizes at reduced depth.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import open_clip
import safetensors.torch as safetensors_torch
import torch
import transformers

from clip_jax import convert
from clip_jax.api import ClipModel
from clip_jax.convert import infer

pytestmark = pytest.mark.torch

# Max |clip_jax - PyTorch| over max |PyTorch| for float32 features (the bound).
TOLERANCE = 1e-4
# Reduced models keep every width but use a smaller vocabulary (the embedding is the
# only tensor that scales with it): that halves their cost and changes no code path.
REDUCED_VOCAB = 4096


def perturb(model: 'torch.nn.Module', seed: int) -> 'torch.nn.Module':
  """Random values everywhere: gains off 1, biases off 0, random BatchNorm statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, tensor in model.state_dict().items():
      if not tensor.dtype.is_floating_point or key == 'logit_scale':
        continue
      if key.endswith('running_var'):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      else:
        tensor.add_(0.02 * torch.randn(tensor.shape, generator=gen))
  return model.eval()


def reduced_model(embed_dim: int, vision: dict, text_width: int, seed: int):
  torch.manual_seed(seed)
  text = dict(context_length=77, vocab_size=REDUCED_VOCAB, width=text_width,
              heads=text_width // 64, layers=2)
  return perturb(open_clip.model.CLIP(embed_dim, vision, text, quick_gelu=True), seed)


def inputs(image_size: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Pixels and token ids laid out as CLIP's tokenizer does (start, words, end, padding)."""
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(2, image_size, image_size, 3)).astype(np.float32)
  tokens = np.zeros((2, 77), np.int64)
  for row, length in enumerate((9, 30)):
    tokens[row, 0] = vocab_size - 2
    tokens[row, 1:length] = rng.integers(1, vocab_size - 2, length - 1)
    tokens[row, length] = vocab_size - 1   # end of text: the largest id, where features are read
  return pixels, tokens


def torch_features(model, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, ...]:
  with torch.no_grad():
    image = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    text = model.encode_text(torch.from_numpy(tokens))
    logits = model.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ \
        torch.nn.functional.normalize(text, dim=-1).T
  return image.numpy(), text.numpy(), logits.numpy()


def jax_features(model: ClipModel, pixels: np.ndarray, tokens: np.ndarray):
  image = np.asarray(model.encode_image(pixels))
  text = np.asarray(model.encode_text(tokens))
  normed = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = np.exp(np.asarray(model.params['logit_scale'])) * normed(image) @ normed(text).T
  return image, text, logits


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_parity(ours, reference, what: str) -> dict[str, float]:
  errors = {}
  for name, a, b in zip(('image', 'text', 'logits'), ours, reference):
    assert a.shape == b.shape, (what, name, a.shape, b.shape)
    errors[name] = relative_error(a, b)
  assert max(errors.values()) <= TOLERANCE, f'{what}: relative errors {errors}'
  return errors


def assert_same_state(ours: dict, reference: dict) -> None:
  """Bit for bit: same keys, shapes, dtypes and values."""
  assert set(ours) == set(reference), sorted(set(ours) ^ set(reference))
  for key, value in reference.items():
    assert ours[key].dtype == value.dtype, (key, ours[key].dtype, value.dtype)
    assert torch.equal(ours[key], value), key


def save_state(model, path: str) -> dict:
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if path.endswith('.safetensors'):
    safetensors_torch.save_file(state, path)
  else:
    torch.save(state, path)
  return state


class Case:
  """One architecture: the open_clip model, its file, the import and both features."""

  def __init__(self, model, tmp: str, suffix: str = '.safetensors', **import_options):
    self.model, self.tmp = model, tmp
    self.source = os.path.join(tmp, 'source' + suffix)
    self.state = save_state(model, self.source)
    self.imported = convert.load_source(self.source, **import_options)
    self.clip = ClipModel(self.imported.config, self.imported.variables)
    cfg = self.imported.config
    self.pixels, self.tokens = inputs(cfg.vision.image_size, cfg.text.vocab_size)
    self.reference = torch_features(model, self.pixels, self.tokens)
    self.ours = jax_features(self.clip, self.pixels, self.tokens)

  def export_openai(self, name: str = 'export/model.safetensors') -> list[str]:
    return convert.export_openai(self.imported.config, self.imported.variables,
                                 os.path.join(self.tmp, name), source=self.imported.source)


@pytest.fixture(scope='module')
def vit_b32(tmp_path_factory):
  torch.manual_seed(0)
  model = perturb(open_clip.create_model('ViT-B-32-quickgelu'), 0)
  folder = tmp_path_factory.mktemp('vit_b32')
  yield Case(model, str(folder), scan_layers=True)
  shutil.rmtree(folder)   # 2.3 GB of exports: not left for the rest of the run


@pytest.fixture(scope='module')
def rn50(tmp_path_factory):
  torch.manual_seed(1)
  model = perturb(open_clip.create_model('RN50-quickgelu'), 1)
  folder = tmp_path_factory.mktemp('rn50')
  yield Case(model, str(folder), suffix='.pt')
  shutil.rmtree(folder)


@pytest.mark.slow
def test_full_size_vit_b32_matches_open_clip_and_round_trips(vit_b32):
  assert vit_b32.imported.config.name == 'ViT-B/32'
  assert infer.is_zoo_architecture(vit_b32.imported.config)
  # Scanned on import: one stacked block per tower.
  assert vit_b32.clip.params['visual']['transformer']['resblocks']['ln_1']['scale'].shape == \
      (12, 768)
  errors = assert_parity(vit_b32.ours, vit_b32.reference, 'ViT-B/32')
  print(f'ViT-B/32 relative errors: {errors}')
  weights, config = vit_b32.export_openai()
  assert_same_state(safetensors_torch.load_file(weights), vit_b32.state)
  assert json.load(open(config))['model_cfg']['vision_cfg']['patch_size'] == 32
  # open_clip's own loader, strict=True, from the built-in name ...
  reloaded = open_clip.create_model('ViT-B-32-quickgelu', pretrained=weights).eval()
  assert_parity(vit_b32.ours, torch_features(reloaded, vit_b32.pixels, vit_b32.tokens),
                'ViT-B/32 export in open_clip')


@pytest.mark.slow
def test_full_size_vit_b32_to_and_from_hugging_face(vit_b32):
  out = os.path.join(vit_b32.tmp, 'hf')
  convert.export_hf(vit_b32.imported.config, vit_b32.imported.variables, out)
  model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  model.eval()
  with torch.no_grad():
    image = model.get_image_features(
        pixel_values=torch.from_numpy(vit_b32.pixels).permute(0, 3, 1, 2)).pooler_output
    text = model.get_text_features(input_ids=torch.from_numpy(vit_b32.tokens)).pooler_output
  assert relative_error(vit_b32.ours[0], image.numpy()) <= TOLERANCE
  assert relative_error(vit_b32.ours[1], text.numpy()) <= TOLERANCE
  # Back in: the same variables bit for bit, and out again: the same file.
  again = convert.load_source(out, scan_layers=True)
  assert again.config.to_dict() == vit_b32.imported.config.to_dict()
  jax.tree.map(np.testing.assert_array_equal, again.variables, vit_b32.imported.variables)
  out2 = os.path.join(vit_b32.tmp, 'hf2')
  convert.export_hf(again.config, again.variables, out2, source=again.source)
  first = safetensors_torch.load_file(os.path.join(out, 'model.safetensors'))
  assert_same_state(safetensors_torch.load_file(os.path.join(out2, 'model.safetensors')), first)
  assert_same_state(first, {k: v for k, v in model.state_dict().items()})


@pytest.mark.slow
def test_full_size_rn50_matches_open_clip_and_round_trips(rn50):
  assert rn50.imported.config.name == 'RN50'
  errors = assert_parity(rn50.ours, rn50.reference, 'RN50')
  print(f'RN50 relative errors: {errors}')
  weights, _ = rn50.export_openai('export/rn50.pt')
  exported = torch.load(weights, weights_only=True)
  assert list(exported) == list(rn50.state)     # OpenAI's key order too
  assert_same_state(exported, rn50.state)
  assert exported['visual.bn1.num_batches_tracked'].dtype == torch.int64
  reloaded = open_clip.create_model('RN50-quickgelu', pretrained=weights).eval()
  assert_parity(rn50.ours, torch_features(reloaded, rn50.pixels, rn50.tokens),
                'RN50 export in open_clip')
  with pytest.raises(ValueError, match='no ModifiedResNet'):
    convert.export_hf(rn50.imported.config, rn50.imported.variables,
                      os.path.join(rn50.tmp, 'hf'))


REDUCED = {
    # name: (embed_dim, vision config at reduced depth, text width)
    'ViT-B/16': (512, dict(image_size=224, layers=2, width=768, patch_size=16), 512),
    'ViT-L/14': (768, dict(image_size=224, layers=2, width=1024, patch_size=14), 768),
    'ViT-L/14@336': (768, dict(image_size=336, layers=1, width=1024, patch_size=14), 768),
    'RN101': (512, dict(image_size=224, layers=[1, 1, 2, 1], width=64), 512),
    'RN50x4': (640, dict(image_size=288, layers=[1, 1, 1, 1], width=80), 640),
    'RN50x16': (768, dict(image_size=384, layers=[1, 1, 1, 1], width=96), 768),
    'RN50x64': (1024, dict(image_size=448, layers=[1, 1, 1, 1], width=128), 1024),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(REDUCED))
def test_reduced_depth_architectures_match_open_clip_and_round_trip(name, tmp_path):
  embed_dim, vision, text_width = REDUCED[name]
  seed = list(REDUCED).index(name) + 10
  case = Case(reduced_model(embed_dim, vision, text_width, seed), str(tmp_path),
              scan_layers=name.startswith('ViT-L'))
  cfg = case.imported.config
  # The nearest zoo entry names the custom config; the sizes are the weights' own.
  assert cfg.name == name and not infer.is_zoo_architecture(cfg)
  assert (cfg.vision.image_size, cfg.vision.width, cfg.embed_dim, cfg.text.width) == \
      (vision['image_size'], vision['width'], embed_dim, text_width)
  errors = assert_parity(case.ours, case.reference, name)
  print(f'{name} (reduced depth) relative errors: {errors}')
  weights, _ = case.export_openai()
  assert_same_state(safetensors_torch.load_file(weights), case.state)


@pytest.mark.slow
def test_custom_export_loads_in_open_clip_from_its_config(tmp_path):
  """open_clip builds a non-zoo model from the exported open_clip_config.json (strict)."""
  embed_dim, vision, text_width = REDUCED['ViT-B/16']
  model = reduced_model(embed_dim, dict(vision, layers=1), text_width, 3)
  case = Case(model, str(tmp_path))
  weights, _ = case.export_openai('export/open_clip_model.safetensors')
  reloaded = open_clip.create_model(f'local-dir:{os.path.dirname(weights)}').eval()
  assert_same_state(reloaded.state_dict(), case.state)
  assert_parity(case.ours, torch_features(reloaded, case.pixels, case.tokens), 'local-dir')


def test_hugging_face_gelu_model_with_eos_pooling(tmp_path):
  """A transformers-made CLIPModel (gelu, pooled at the first eos_token_id) imports exactly."""
  torch.manual_seed(5)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                       hidden_act='gelu', eos_token_id=7),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8, hidden_act='gelu'),
      projection_dim=48)
  model = perturb(transformers.CLIPModel(config), 5)
  model.save_pretrained(tmp_path / 'hf')
  imported = convert.load_source(tmp_path / 'hf')
  cfg = imported.config
  assert (cfg.activation, cfg.text_pool, cfg.eot_token_id) == ('gelu', 'eot_id', 7)
  clip = ClipModel(cfg, imported.variables)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = rng.integers(8, 1000, (2, 16))
  tokens[0, 5], tokens[1, 11] = 7, 7
  tokens[1, 3] = 999            # a larger id before the eos: argmax pooling would differ
  with torch.no_grad():
    image = model.get_image_features(
        pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    text = model.get_text_features(input_ids=torch.from_numpy(tokens)).pooler_output.numpy()
  assert relative_error(np.asarray(clip.encode_image(pixels)), image) <= TOLERANCE
  assert relative_error(np.asarray(clip.encode_text(tokens)), text) <= TOLERANCE
  out = tmp_path / 'again'
  convert.export_hf(cfg, imported.variables, out, source=imported.source)
  assert_same_state(safetensors_torch.load_file(out / 'model.safetensors'), model.state_dict())
  written = json.load(open(out / 'config.json'))
  assert written['text_config']['eos_token_id'] == 7
  assert written['vision_config']['hidden_act'] == 'gelu'
