"""Configs: every file in configs/ loads and validates; bad ones are named clearly."""

import glob
import importlib.util
import math
import os
import re

import pytest

from clip_jax import config as base
from clip_jax import recipes
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
def test_config_files_load_and_validate(path):
  module = load_config_file(path)
  base.validate(module.get_config())
  if os.path.basename(path) != 'tiny.py':
    base.validate(module.get_config('local'))


# Radford et al. 2021, Appendix F (Tables 18-20) and OpenAI's released weights, as
# /work/shared/reference/{paper_recipes,openai_models}.json give them: config file ->
# (architecture, peak learning rate, steps, zero-shot ImageNet top-1 of OpenAI's weights).
PAPER = {
    'rn50': ('RN50', 5e-4, 390_625, 59.8),
    'rn101': ('RN101', 5e-4, 390_625, 62.3),
    'rn50x4': ('RN50x4', 5e-4, 390_625, 66.3),
    'rn50x16': ('RN50x16', 4e-4, 390_625, 70.7),
    'rn50x64': ('RN50x64', 3.6e-4, 390_625, 73.9),
    'vit_b32': ('ViT-B/32', 5e-4, 390_625, 63.3),
    'vit_b16': ('ViT-B/16', 5e-4, 390_625, 68.3),
    'vit_l14': ('ViT-L/14', 4e-4, 390_625, 75.5),
    'vit_l14_336': ('ViT-L/14@336', 2e-5, 12_207, 76.6),   # one more epoch of ViT-L/14
}
PAPER_COMMON = dict(batch_size=32_768, warmup_steps=2_000, weight_decay=0.2)
PAPER_ADAM = {'resnet': (0.9, 0.999, 1e-8), 'vit': (0.9, 0.98, 1e-6)}


def test_recipes_module_holds_the_papers_numbers():
  assert (recipes.BATCH_SIZE, recipes.WARMUP_STEPS, recipes.WEIGHT_DECAY) == (
      PAPER_COMMON['batch_size'], PAPER_COMMON['warmup_steps'], PAPER_COMMON['weight_decay'])
  assert recipes.TOTAL_STEPS == 32 * 400_000_000 // 32_768 == 390_625
  assert recipes.LEARNING_RATE == {arch: lr for arch, lr, _, _ in PAPER.values()}
  assert {arch: recipes.STEPS.get(arch, recipes.TOTAL_STEPS) for arch, *_ in PAPER.values()} == {
      arch: steps for arch, _, steps, _ in PAPER.values()}
  assert {k: (v['b1'], v['b2'], v['eps']) for k, v in recipes.ADAM.items()} == PAPER_ADAM


@pytest.mark.parametrize('name', sorted(PAPER))
def test_arch_config_is_the_paper_run(name):
  arch, lr, steps, _ = PAPER[name]
  config = load_config_file(os.path.join(CONFIG_DIR, f'{name}.py')).get_config()
  assert config.model.name == arch and config.model.dtype == 'bfloat16'
  assert (config.batch_size, config.total_steps) == (PAPER_COMMON['batch_size'], steps)
  o = config.optim
  assert (o.learning_rate, o.warmup_steps, o.weight_decay, o.end_lr_factor) == (
      lr, PAPER_COMMON['warmup_steps'], PAPER_COMMON['weight_decay'], 0.0)
  assert (o.b1, o.b2, o.eps) == PAPER_ADAM['resnet' if arch.startswith('RN') else 'vit']
  assert config.model.logit_scale_max == pytest.approx(math.log(100.0))
  # The paper's architecture as OpenAI released it (nothing overridden but compute options).
  reference = model_config(arch)
  for key in ('vision', 'text', 'embed_dim', 'activation', 'text_pool', 'eot_token_id'):
    assert config.model[key] == reference[key], key
  # The pod's batch must split over data x fsdp x micro-batches on 128 or 256 chips.
  assert config.batch_size % (256 * config.train.micro_batches) == 0


@pytest.mark.parametrize('name', sorted(PAPER))
def test_arch_config_documents_its_run(name):
  arch, _, _, top1 = PAPER[name]
  module = load_config_file(os.path.join(CONFIG_DIR, f'{name}.py'))
  doc = ' '.join(module.__doc__.split())
  assert (f"python -m clip_jax.main --config=configs/{name}.py --workdir=gs://my-bucket/{name} "
          "\\ --config.data.train.pattern='gs://my-bucket/shards/*.tar'") in doc
  assert f'python -m clip_jax.main --config=configs/{name}.py:local --workdir=./{name}_local' in doc
  assert f'reach {top1}% zero-shot ImageNet top-1' in doc
  assert re.search(r'on a TPU v5p-\d+ \(\d+ chips, \d+ pairs each\)', doc)
  assert re.search(r'about [\d.]+ (hours|days) \(an estimate', doc)
  # What the CPU variant costs, measured: its time, or the memory it needs beyond the VM's.
  assert re.search(r'measured on a 2-core VM: [\d.]+ min|needs more than \d+ GB of memory', doc)


@pytest.mark.parametrize('name', sorted(PAPER))
def test_local_variant_is_the_same_recipe_on_a_cpu(name):
  module = load_config_file(os.path.join(CONFIG_DIR, f'{name}.py'))
  paper, local = module.get_config(), module.get_config('local')
  assert local.optim == paper.optim and local.model.dtype == paper.model.dtype
  for key in ('vision', 'text', 'embed_dim', 'scan_layers', 'remat_policy'):
    assert local.model[key] == paper.model[key], key
  assert local.batch_size == 2 and local.total_steps < 10 and local.builtin.enabled
  # The built-in SentencePiece tokenizer ends texts with id 3.
  assert (local.model.text_pool, local.model.eot_token_id) == ('eot_id', 3)
  assert local.eval.zeroshot == 'builtin' and 0 < local.eval.max_examples <= 4
  with pytest.raises(ValueError, match=r'unknown variant .pod.'):
    module.get_config('pod')


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


def test_train_stages_parse_and_default_to_the_models_settings():
  config = base.get_config('tiny')
  config.total_steps = 6
  assert base.training_stages(config) == (base.Stage(6, 0.0, 32, 16),)
  config.model.vision.mask_ratio = 0.25
  assert base.training_stages(config) == (base.Stage(6, 0.25, 32, 16),)
  config.train.stages = ((2, 0.5, 16, 8), [6, 0, 32, 16])   # lists as config.json has them
  base.validate(config)
  stages = base.training_stages(config)
  assert stages == (base.Stage(2, 0.5, 16, 8), base.Stage(6, 0.0, 32, 16))
  assert [base.stage_index(stages, s) for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
  assert stages[0].describe() == 'mask 0.5, 16 px, 8 tokens'


def test_train_stages_override_from_the_command_line(monkeypatch):
  """The syntax config.py documents: a tuple of tuples (config_flags reads sys.argv)."""
  from absl import flags
  from ml_collections import config_flags
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=False)
  argv = ['main', f'--config={os.path.join(CONFIG_DIR, "tiny.py")}', '--config.total_steps=6',
          '--config.train.stages=((4,0.5,16,8),(6,0.0,32,16))']
  monkeypatch.setattr('sys.argv', argv)
  values(argv)
  assert base.training_stages(values.config) == (base.Stage(4, 0.5, 16, 8),
                                                 base.Stage(6, 0.0, 32, 16))


@pytest.mark.parametrize('arch, stages, message', [
    ('tiny', ((2, 0.5, 16), (6, 0.0, 32, 16)), r'stages\[0\]: expected \(until_step, '),
    ('tiny', ((4, 0.5, 16, 8), (4, 0.0, 32, 16)), r'stages\[1\]: until_step 4 is not after'),
    ('tiny', ((2, 0.5, 16, 8), (5, 0.0, 32, 16)), r'stages\[1\]: until_step 5; the last stage '
     r'must end at config\.total_steps=6'),
    ('tiny', ((0, 0.5, 16, 8), (6, 0.0, 32, 16)), r'stages\[0\]: until_step expected a positive'),
    ('tiny', ((2, 1.0, 16, 8), (6, 0.0, 32, 16)), r'stages\[0\]: mask_ratio expected a number'),
    ('tiny', ((2, -0.1, 16, 8), (6, 0.0, 32, 16)), r'stages\[0\]: mask_ratio'),
    ('tiny', ((2, 0.5, 20, 8), (6, 0.0, 32, 16)),
     r'stages\[0\]: the model cannot run .*config\.model\.vision\.patch_size: 8 does not divide'),
    ('tiny', ((2, 0.5, 16, 17), (6, 0.0, 32, 16)),
     r'stages\[0\]: text_length expected an integer in \[2, '
     r'config\.model\.text\.context_length=16'),
    ('tiny', ((2, 0.5, 16, 1), (6, 0.0, 32, 16)), r'stages\[0\]: text_length'),
    ('RN50', ((2, 0.5, 224, 77), (6, 0.0, 224, 77)),
     r'stages\[0\]: the model cannot run .*config\.model\.vision\.mask_ratio'),
    ('RN50', ((2, 0.0, 100, 77), (6, 0.0, 224, 77)),
     r'stages\[0\]: the model cannot run .*config\.model\.vision\.image_size: 100'),
])
def test_bad_train_stages_name_the_stage(arch, stages, message):
  config = base.get_config(arch)
  config.total_steps = 6
  config.train.stages = stages
  with pytest.raises(ValueError, match=r'config\.train\.' + message):
    base.validate(config)


def test_the_documented_stage_recipes_fit_vit_b16():
  """The FLIP and CLIPA examples config.py gives for config.train.stages validate for the
  ViT-B/16 recipe, ending with an unmasked full-size stage."""
  import ast
  import inspect
  examples = re.findall(r"--config\.train\.stages='([^']+)'", inspect.getsource(base))
  assert len(examples) == 2, examples
  config = load_config_file(os.path.join(CONFIG_DIR, 'vit_b16.py')).get_config()
  firsts = set()
  for example in examples:
    config.train.stages = ast.literal_eval(example)
    base.validate(config)
    first, last = base.training_stages(config)
    assert last.settings == (0.0, 224, 77)
    firsts.add(first.settings)
  assert firsts == {(0.5, 224, 77), (0.0, 112, 32)}     # FLIP's, CLIPA's
