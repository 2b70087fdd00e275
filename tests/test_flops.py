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
