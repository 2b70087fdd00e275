"""clip_jax.flops: the analytic count against open_clip's profile and XLA's, the peak table."""

import jax
import pytest

from clip_jax.flops import model_flops, peak_flops
from clip_jax.models.architectures import model_config
from clip_jax.models.clip import build_model, dummy_inputs, param_shapes

# open_clip's docs/model_profile.csv (fvcore counts a multiply-add as one FLOP, so these
# are GMACs per image / caption): ours must agree to 1%.
OPEN_CLIP_GMACS = {'ViT-B/32': (4.41, 2.96), 'ViT-B/16': (17.58, 2.96),
                   'ViT-L/14': (81.08, 6.65)}


@pytest.mark.parametrize('name', sorted(OPEN_CLIP_GMACS))
def test_model_flops_match_open_clip_profile(name):
  flops = model_flops(model_config(name), batch=1, pooled=False)
  image, text = OPEN_CLIP_GMACS[name]
  assert flops['image_forward'] / 2e9 == pytest.approx(image, rel=0.01)
  assert flops['text_forward'] / 2e9 == pytest.approx(text, rel=0.01)
  assert flops['total'] == 3 * (flops['image_forward'] + flops['text_forward']
                                + flops['loss_forward'])
  # The unrolled model's last block runs for the pooled token only: 5/6 of a layer less.
  pooled = model_flops(model_config(name), batch=1)
  layers = model_config(name).vision.layers
  assert (1 - 1 / layers < pooled['image_forward'] / flops['image_forward']
          < 1 - 0.75 / layers)


# XLA's count includes elementwise work (norms, activations, softmax), so it is a few
# percent above the matmul count for real models; 5% is the stated tolerance.
@pytest.mark.parametrize('name', ['RN50', 'ViT-B/32', 'tiny'])
def test_forward_flops_match_xla_cost_analysis(name):
  cfg = model_config(name)
  model = build_model(cfg)
  variables = param_shapes(cfg)
  images, tokens = dummy_inputs(cfg, batch=2)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  image_cost = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)).lower(
      variables, abstract(images)).cost_analysis()['flops']
  text_cost = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)).lower(
      variables, abstract(tokens)).cost_analysis()['flops']
  flops = model_flops(cfg, batch=2)
  assert image_cost / flops['image_forward'] == pytest.approx(1.0, abs=0.05)
  assert text_cost / flops['text_forward'] == pytest.approx(1.0, abs=0.05)


def test_peak_table_lookup():
  class Fake:
    def __init__(self, kind):
      self.device_kind = kind
  assert peak_flops(Fake('NVIDIA H100 80GB HBM3'), 'bfloat16') == 989e12
  assert peak_flops(Fake('NVIDIA H100 PCIe'), 'bfloat16') == 756e12
  assert peak_flops(Fake('TPU v5 lite'), 'bfloat16') == 197e12
  assert peak_flops(Fake('TPU v4'), 'float32') == 275e12
  assert peak_flops(Fake('cpu'), 'float32') is None


def test_stage_arguments_default_to_the_model():
  cfg = model_config('ViT-B/16')
  assert model_flops(cfg, 4) == model_flops(cfg, 4, mask_ratio=0.0, image_size=224,
                                            text_length=77)


@pytest.mark.parametrize('ratio, kept', [(0.5, 98), (0.75, 49)])
def test_masked_flops_count_the_kept_tokens(ratio, kept):
  """FLIP on ViT-B/16: the encoder runs on 1 + kept of 197 tokens; the patch embedding
  and the text tower are unchanged."""
  cfg = model_config('ViT-B/16')
  v = cfg.vision
  full = model_flops(cfg, 8, pooled=False)
  masked = model_flops(cfg, 8, pooled=False, mask_ratio=ratio)
  patch_embed = 2 * 8 * 196 * 16 * 16 * 3 * v.width
  head = 2 * 8 * v.width * cfg.embed_dim

  def encoder(tokens):   # per layer: linear in the tokens, plus attention's tokens^2
    return 8 * v.layers * (tokens * 24 * v.width ** 2 + 4 * tokens ** 2 * v.width)
  assert full['image_forward'] == patch_embed + encoder(197) + head
  assert masked['image_forward'] == patch_embed + encoder(kept + 1) + head
  ratio_run = (masked['image_forward'] - patch_embed - head) / encoder(197)
  assert ((kept + 1) / 197) ** 2 < ratio_run < (kept + 1) / 197
  assert masked['text_forward'] == full['text_forward']
  assert masked['total'] == 3 * (masked['image_forward'] + masked['text_forward']
                                 + masked['loss_forward'])


# The count follows what the model runs: XLA's count of the masked forward at a smaller
# stage image size (its positional embedding resampled), and of a shorter text.
@pytest.mark.parametrize('ratio', [0.0, 0.5, 0.75])
def test_stage_flops_match_xla_cost_analysis(ratio):
  cfg = model_config('ViT-B/32')
  model = build_model(cfg)
  variables = param_shapes(cfg)
  images = jax.ShapeDtypeStruct((2, 160, 160, 3), jax.numpy.float32)
  tokens = jax.ShapeDtypeStruct((2, 32), jax.numpy.int32)
  image_cost = jax.jit(lambda v, x: model.apply(
      v, x, mask_ratio=ratio, rngs={'mask': jax.random.key(0)},
      method=model.encode_image)).lower(variables, images).cost_analysis()['flops']
  text_cost = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)).lower(
      variables, tokens).cost_analysis()['flops']
  flops = model_flops(cfg, batch=2, mask_ratio=ratio, image_size=160, text_length=32)
  assert image_cost / flops['image_forward'] == pytest.approx(1.0, abs=0.05)
  assert text_cost / flops['text_forward'] == pytest.approx(1.0, abs=0.05)
  if ratio:
    assert flops['image_forward'] < model_flops(cfg, batch=2, image_size=160)['image_forward']


def test_resnet_flops_refuse_masking_and_follow_the_image_size():
  cfg = model_config('RN50')
  with pytest.raises(ValueError, match=r'config\.model\.vision\.mask_ratio'):
    model_flops(cfg, 1, mask_ratio=0.5)
  # Convolutions scale with the pixels (4x); the attention pool's one query and its
  # projection do not, so the tower grows a little less.
  base = model_flops(cfg, 1)['image_forward']
  assert 3.98 < model_flops(cfg, 1, image_size=448)['image_forward'] / base < 4
