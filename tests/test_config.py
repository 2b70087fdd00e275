"""Configs: every file in configs/ loads and validates; bad ones are named clearly."""

import glob
import importlib.util
import os

import pytest

from clip_jax import config as base
from clip_jax.models import build_model, model_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))


def load_config_file(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_one_config_per_architecture_plus_tiny():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert {'rn50', 'rn101', 'rn50x4', 'rn50x16', 'rn50x64', 'vit_b32', 'vit_b16', 'vit_l14',
          'vit_l14_336', 'tiny'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_config_files_load_validate_and_document_themselves(path):
  module = load_config_file(path)
  config = module.get_config()
  base.validate(config)
  doc = module.__doc__ or ''
  assert f'configs/{os.path.basename(path)}' in doc, 'the docstring shows the command'
  assert 'python -m clip_jax.main' in doc


@pytest.mark.parametrize('mutate, field', [
    (lambda c: c.vision.update(type='vgg'), 'config.model.vision.type'),
    (lambda c: c.vision.update(patch_size=30), 'config.model.vision.patch_size'),
    (lambda c: c.vision.update(heads=5), 'config.model.vision.heads'),
    (lambda c: c.text.update(heads=3), 'config.model.text.heads'),
    (lambda c: c.update(activation='relu6'), 'config.model.activation'),
    (lambda c: c.update(dtype='int8'), 'config.model.dtype'),
    (lambda c: c.update(remat_policy='some'), 'config.model.remat_policy'),
])
def test_bad_model_config_names_the_field(mutate, field):
  cfg = model_config('ViT-B/32')
  mutate(cfg)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    build_model(cfg)


def test_bad_resnet_config_names_the_field():
  cfg = model_config('RN50')
  cfg.vision.image_size = 200
  with pytest.raises(ValueError, match=r'config\.model\.vision\.image_size'):
    build_model(cfg)


def test_unknown_architecture_is_named():
  with pytest.raises(ValueError, match=r"config\.model\.name: unknown architecture 'ViT-X/9'"):
    base.get_config('ViT-X/9')


def test_unknown_config_key_is_named():
  config = base.get_config('tiny')
  config.learning_rat = 0.1
  with pytest.raises(ValueError, match=r'config\.learning_rat'):
    base.validate(config)


def test_unknown_model_option_is_named():
  with pytest.raises(ValueError, match=r'config\.model: unknown option\(s\) \[.scan_layer.\]'):
    model_config('tiny', scan_layer=True)


def test_architecture_aliases():
  from clip_jax.models import canonical_name
  assert canonical_name('vit_b32') == canonical_name('ViT-B-32') == 'ViT-B/32'
  assert canonical_name('vit_l14_336') == 'ViT-L/14@336'
  assert canonical_name('rn50x4') == 'RN50x4'
