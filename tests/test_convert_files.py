"""Weight files: read safely, refused clearly, round-tripped exactly; the CLI and clip_jax.load.

Small models only (no full-size compile): what is tested here is the file handling,
the key and shape checks, dtypes, TorchScript archives and the command line.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import open_clip
import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers

import clip_jax
from clip_jax import convert
from clip_jax.convert import safe_load
from clip_jax.convert.__main__ import main

pytestmark = pytest.mark.torch

VOCAB, CONTEXT = 1000, 16


def small_model(seed: int = 0, resnet: bool = False):
  """A small open_clip CLIP with every tensor random (BatchNorm statistics included)."""
  torch.manual_seed(seed)
  vision = (dict(image_size=32, layers=[1, 1, 1, 1], width=16) if resnet else
            dict(image_size=32, layers=2, width=64, patch_size=8))
  text = dict(context_length=CONTEXT, vocab_size=VOCAB, width=64, heads=1, layers=2)
  model = open_clip.model.CLIP(48, vision, text, quick_gelu=True)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, tensor in model.state_dict().items():
      if key.endswith('running_var'):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      elif tensor.dtype.is_floating_point and key != 'logit_scale':
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
  return model.eval()


def sample_inputs() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, VOCAB - 2, (2, CONTEXT))
  tokens[0, 4], tokens[1, 9] = VOCAB - 1, VOCAB - 1
  return rng.normal(size=(2, 32, 32, 3)).astype(np.float32), tokens


def open_clip_features(model, pixels, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy(),
            model.encode_text(torch.from_numpy(tokens)).numpy())


def assert_close(ours, reference):
  ours = np.asarray(ours)
  assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


def state_of(model) -> dict:
  return {k: v.contiguous() for k, v in model.state_dict().items()}


def assert_same_state(ours: dict, reference: dict) -> None:
  assert list(ours) == list(reference)
  for key, value in reference.items():
    assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class Payload:
  """Unpickling this would create a directory: the proof that code ran."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


# --- safetensors -----------------------------------------------------------------------------

def test_safetensors_round_trip_in_every_dtype_and_torch_reads_ours(tmp_path):
  tensors = {'f32': np.arange(6, dtype=np.float32).reshape(2, 3),
             'f16': np.linspace(-1, 1, 5).astype(np.float16),
             'bf16': np.linspace(-2, 2, 7).astype(ml_dtypes.bfloat16),
             'counter': np.array(7, np.int64),
             'transposed': np.arange(12, dtype=np.float32).reshape(3, 4).T,
             'mask': np.array([True, False])}
  path = tmp_path / 'x.safetensors'
  safe_load.write_safetensors(path, tensors, metadata={'note': 'hi'})
  back, meta = safe_load.read_safetensors(path)
  assert meta == {'note': 'hi'} and list(back) == list(tensors)
  theirs = safetensors_torch.load_file(path)
  for key, value in tensors.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value)
    np.testing.assert_array_equal(as_numpy(theirs[key]), value)
  assert theirs['bf16'].dtype == torch.bfloat16 and theirs['counter'].shape == ()


def test_import_and_export_work_after_tensorflow_in_one_process(tmp_path):
  """clip_jax's PyTorch file paths import plain torch, never its compiler stack (which
  crashes after tensorflow in these wheels), so a tf.data job can convert in-process."""
  source, out = tmp_path / 'source.pt', tmp_path / 'out.pt'
  torch.save(small_model().state_dict(), source)
  code = f"""
import sys
import numpy as np
import tensorflow as tf
assert int(tf.data.Dataset.range(4).reduce(np.int64(0), lambda a, b: a + b)) == 6
from clip_jax import convert
from clip_jax.models.params import flatten_names
imported = convert.load_source({str(source)!r})
paths = convert.export_openai(imported.config, imported.variables, {str(out)!r})
again = convert.load_source(paths[0])
before, after = flatten_names(imported.variables), flatten_names(again.variables)
assert before.keys() == after.keys()
assert all(np.array_equal(before[k], after[k]) for k in before)
assert 'torch._dynamo' not in sys.modules, 'torch compiler stack loaded'
print('round trip after tensorflow: ok')
"""
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)) or '.')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'round trip after tensorflow: ok' in proc.stdout


def test_truncated_safetensors_is_refused(tmp_path):
  path = tmp_path / 'model.safetensors'
  safetensors_torch.save_file(state_of(small_model()), path)
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  with pytest.raises(safe_load.CorruptFileError, match=r'truncated: tensor .* needs bytes up to'):
    convert.load_source(path)
  path.write_bytes(data[:6])
  with pytest.raises(safe_load.CorruptFileError, match='less than the 8-byte header'):
    convert.load_source(path)
  path.write_bytes(data[:8] + b'{not json' + data[17:200])
  with pytest.raises(safe_load.CorruptFileError, match='header claims|not JSON'):
    convert.load_source(path)


def test_corrupt_files_are_refused(tmp_path):
  noise = tmp_path / 'noise.pt'
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(safe_load.CorruptFileError,
                     match='noise.pt: neither a safetensors file nor a PyTorch'):
    convert.load_source(noise)
  empty = tmp_path / 'empty.pt'
  empty.write_bytes(b'')
  with pytest.raises(safe_load.CorruptFileError, match='empty.pt'):
    convert.load_source(empty)
  # A torch.save zip with one tensor's data cut short.
  full = tmp_path / 'full.pt'
  torch.save({'w': torch.ones(1000)}, full)
  broken = tmp_path / 'broken.pt'
  with zipfile.ZipFile(full) as src, zipfile.ZipFile(broken, 'w') as dst:
    for name in src.namelist():
      data = src.read(name)
      dst.writestr(name, data[:100] if name.endswith('/data/0') else data)
  with pytest.raises(safe_load.CorruptFileError, match='broken.pt'):
    convert.load_source(broken)
  with pytest.raises(safe_load.CorruptFileError, match='truncated tensor data'):
    safe_load.read_torch_zip_restricted(str(broken))
  with pytest.raises(FileNotFoundError, match='no such file'):
    convert.load_source(tmp_path / 'missing.pt')


def test_pickles_that_would_run_code_are_refused(tmp_path):
  marker = str(tmp_path / 'code_ran')
  state = {'weight': torch.ones(2), 'payload': Payload(marker)}
  zipped = tmp_path / 'evil.pt'
  torch.save(state, zipped)
  with pytest.raises(safe_load.UnsafeFileError, match='evil.pt: refused.*arbitrary unpickling'):
    convert.load_source(zipped)
  # The torch-free reader refuses it too, naming the global it would have called.
  with pytest.raises(safe_load.UnsafeFileError, match=r'global posix\.mkdir|global os\.mkdir'):
    safe_load.read_torch_zip_restricted(str(zipped))
  legacy = tmp_path / 'legacy.pt'
  legacy.write_bytes(pickle.dumps(state, protocol=2))
  with pytest.raises(safe_load.UnsafeFileError, match='legacy.pt: refused'):
    convert.load_source(legacy)
  # A TorchScript-looking archive whose data.pkl names a function: never executed.
  script = tmp_path / 'script.pt'
  with zipfile.ZipFile(script, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps(Payload(marker), protocol=2))
    archive.writestr('archive/code/__torch__.py', 'class M(Module):\n  pass\n')
  with pytest.raises(safe_load.UnsafeFileError, match='script.pt: refused'):
    convert.load_source(script)
  assert not os.path.exists(marker)


def test_torch_free_reader_matches_torch_load(tmp_path, monkeypatch):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {'module.f32': torch.randn(3, 5), 'module.f16': torch.randn(4).half(),
           'module.bf16': torch.randn(2, 2).bfloat16(), 'module.count': torch.tensor(3),
           'module.strided': base.T, 'module.view': base[1:3, 2:], 'module.scalar': torch.tensor(2.5)}
  path = tmp_path / 'wrapped.pt'
  torch.save({'state_dict': state, 'epoch': 3}, path)
  with_torch = safe_load.read_state_dict(path)
  monkeypatch.setattr(safe_load, '_has_torch', lambda: False)
  without = safe_load.read_state_dict(path)
  assert list(with_torch) == list(without) == [k[len('module.'):] for k in state]
  for key, value in state.items():
    key = key[len('module.'):]
    assert without[key].dtype == with_torch[key].dtype
    np.testing.assert_array_equal(without[key], as_numpy(value))
    np.testing.assert_array_equal(with_torch[key], as_numpy(value))


class OpenAIJit(torch.nn.Module):
  """What OpenAI's released archives are: the model plus three shape buffers."""

  def __init__(self, model):
    super().__init__()
    self.inner = model
    self.register_buffer('input_resolution', torch.tensor(32))
    self.register_buffer('context_length', torch.tensor(CONTEXT))
    self.register_buffer('vocab_size', torch.tensor(VOCAB))

  def forward(self, image, text):
    return self.inner.encode_image(image), self.inner.encode_text(text)


def test_torchscript_archive_is_read_without_torch_jit(tmp_path):
  model = small_model(3)
  pixels, tokens = sample_inputs()
  traced = torch.jit.trace(OpenAIJit(model), (torch.zeros(1, 3, 32, 32),
                                              torch.zeros(1, CONTEXT, dtype=torch.long)),
                           check_trace=False)
  path = tmp_path / 'ViT-tiny.pt'
  traced.save(str(path))
  reference = {k: v for k, v in torch.jit.load(str(path)).state_dict().items()}
  ours = safe_load.read_state_dict(path)
  assert list(ours) == list(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(ours[key], value.numpy())
  # Import (module. prefix: the traced wrapper's 'inner.' is what open_clip would strip).
  plain = {k[len('inner.'):]: v for k, v in ours.items() if k.startswith('inner.')}
  plain.update({k: v for k, v in ours.items() if not k.startswith('inner.')})
  imported = convert.import_state_dict(plain, source=str(path))
  assert imported.config.vision.image_size == 32
  out = convert.export_openai(imported.config, imported.variables, tmp_path / 'out.safetensors',
                              source=imported.source)[0]
  expected = {k: v for k, v in plain.items()
              if k not in ('input_resolution', 'context_length', 'vocab_size')}
  exported = safe_load.read_state_dict(out)
  assert list(exported) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key], value)
  assert_close(clip_jax.api.ClipModel(imported.config, imported.variables).encode_text(tokens),
               open_clip_features(model, pixels, tokens)[1])


# --- key and shape checks, dtypes ---------------------------------------------------------------

def test_wrong_missing_or_extra_keys_name_the_key_and_shapes(tmp_path):
  state = {k: v.numpy() for k, v in state_of(small_model()).items()}
  with pytest.raises(convert.KeyMismatchError,
                     match=r"'positional_embedding' has shape \(16, 64\), expected \(77, 512\) "
                     r'for --config ViT-B/32'):
    convert.import_state_dict(state, config='ViT-B/32')
  missing = dict(state)
  del missing['ln_final.bias']
  with pytest.raises(convert.KeyMismatchError, match=r"missing key 'ln_final.bias' \(expected "
                     r'shape \(64,\)'):
    convert.import_state_dict(missing)
  extra = dict(state, **{'visual.extra.weight': np.zeros((2, 3), np.float32)})
  with pytest.raises(convert.KeyMismatchError,
                     match=r"unexpected key 'visual.extra.weight' \(shape \(2, 3\)\)"):
    convert.import_state_dict(extra)
  wrong = dict(state, **{'visual.proj': np.zeros((64, 32), np.float32)})
  with pytest.raises(convert.KeyMismatchError,
                     match=r"'visual.proj' has shape \(64, 32\), expected \(64, 48\)"):
    convert.import_state_dict(wrong)
  # A CLI run with a wrong --config says the same and exits 1.
  path = tmp_path / 'small.safetensors'
  safetensors_torch.save_file(state_of(small_model()), path)
  assert main(['import', '--source', str(path), '--workdir', str(tmp_path / 'w'),
               '--config', 'tiny']) == 1


def test_dtypes_are_preserved_or_cast(tmp_path):
  model = small_model(1).half()
  path = tmp_path / 'half.pt'
  torch.save(state_of(model), path)
  imported = convert.load_source(path)                       # stored float32 by default
  assert imported.variables['params']['visual']['proj'].dtype == np.float32
  out = convert.export_openai(imported.config, imported.variables, tmp_path / 'back.pt',
                              source=imported.source)[0]
  assert_same_state(torch.load(out, weights_only=True), state_of(model))   # float16 again
  cast = convert.export_openai(imported.config, imported.variables, tmp_path / 'bf16.safetensors',
                               dtype='bfloat16', source=imported.source)[0]
  assert {v.dtype for v in safetensors_torch.load_file(cast).values()} == {torch.bfloat16}
  kept = convert.load_source(path, weights_dtype='source')
  assert kept.variables['params']['visual']['proj'].dtype == np.float16
  narrow = convert.load_source(path, weights_dtype='bfloat16')
  assert narrow.variables['params']['logit_scale'].dtype == ml_dtypes.bfloat16


# --- the command line and clip_jax.load ---------------------------------------------------------

def test_cli_import_export_and_load_every_source(tmp_path, capsys):
  model = small_model(2)
  pixels, tokens = sample_inputs()
  reference = open_clip_features(model, pixels, tokens)
  source = tmp_path / 'small.pt'
  torch.save({'state_dict': {'module.' + k: v for k, v in state_of(model).items()}}, source)
  workdir = tmp_path / 'workdir'
  assert main(['import', '--source', str(source), '--workdir', str(workdir),
               '--scan-layers']) == 0
  printed = capsys.readouterr().out
  assert f'wrote a clip_jax checkpoint (step 0) and config.json to {workdir}' in printed
  assert json.loads((workdir / 'config.json').read_text())['model']['scan_layers'] is True

  for path, options in ((workdir, {}), (source, {'scan_layers': True})):
    loaded = clip_jax.load(str(path), **options)
    assert_close(loaded.encode_image(pixels), reference[0])
    assert_close(loaded.encode_text(tokens), reference[1])
  with pytest.raises(ValueError, match=r"cannot override \['embed_dim'\]; the weights fix"):
    clip_jax.load(str(workdir), embed_dim=32)

  out = tmp_path / 'export' / 'small.pth'
  assert main(['export', '--workdir', str(workdir), '--format', 'openai', '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert f'wrote {out}' in printed and f"local-dir:{out.parent}" in printed
  assert_same_state(torch.load(out, weights_only=True), state_of(model))
  reloaded = open_clip.create_model(f'local-dir:{out.parent}').eval()    # open_clip_config.json
  np.testing.assert_array_equal(open_clip_features(reloaded, pixels, tokens)[0], reference[0])

  hf = tmp_path / 'hf'
  assert main(['export', '--workdir', str(workdir), '--format', 'hf', '--out', str(hf)]) == 0
  hf_model, info = transformers.CLIPModel.from_pretrained(hf, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  with torch.no_grad():
    text = hf_model.eval().get_text_features(input_ids=torch.from_numpy(tokens)).pooler_output
  assert_close(text.numpy(), reference[1])
  from_hf = clip_jax.load(str(hf))
  assert_close(from_hf.encode_image(pixels), reference[0])
  jax.tree.map(np.testing.assert_array_equal, from_hf.params,
               clip_jax.load(str(source)).params)


def test_cli_refuses_resnet_to_hugging_face_and_bad_files(tmp_path, capsys):
  with pytest.raises(SystemExit):
    main(['--help'])
  assert 'import' in capsys.readouterr().out
  source = tmp_path / 'rn.safetensors'
  model = small_model(4, resnet=True)
  safetensors_torch.save_file(state_of(model), source)
  workdir = tmp_path / 'rn'
  assert main(['import', '--source', str(source), '--workdir', str(workdir)]) == 0
  capsys.readouterr()
  assert main(['export', '--workdir', str(workdir), '--format', 'hf',
               '--out', str(tmp_path / 'hf')]) == 1
  assert 'no ModifiedResNet CLIP' in capsys.readouterr().err
  assert main(['export', '--workdir', str(workdir), '--format', 'openai',
               '--out', str(tmp_path / 'rn_out')]) == 0
  exported = safetensors_torch.load_file(tmp_path / 'rn_out' / 'open_clip_model.safetensors')
  assert_same_state({k: exported[k] for k in state_of(model)}, state_of(model))
  assert set(exported) == set(state_of(model))
  bad = tmp_path / 'bad.pt'
  bad.write_bytes(b'\x00' * 64)
  assert main(['import', '--source', str(bad), '--workdir', str(tmp_path / 'x')]) == 1
  assert 'bad.pt: neither a safetensors file nor a PyTorch' in capsys.readouterr().err


def test_hugging_face_shards_and_unsupported_configs(tmp_path):
  imported = convert.import_state_dict({k: v.numpy() for k, v in state_of(small_model(6)).items()})
  single = tmp_path / 'single'
  convert.export_hf(imported.config, imported.variables, single)
  tensors, _ = safe_load.read_safetensors(single / 'model.safetensors')
  # The same weights split over two shards with an index, as save_pretrained does for big models.
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  (sharded / 'config.json').write_text((single / 'config.json').read_text())
  keys = list(tensors)
  weight_map = {}
  for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
    name = f'model-0000{i + 1}-of-00002.safetensors'
    safe_load.write_safetensors(sharded / name, {k: tensors[k] for k in part})
    weight_map.update({k: name for k in part})
  (sharded / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  again = convert.load_source(sharded)
  jax.tree.map(np.testing.assert_array_equal, again.variables, imported.variables)
  config = json.loads((single / 'config.json').read_text())
  config['vision_config']['hidden_act'] = 'gelu_new'
  (single / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"hidden_act \['gelu', 'gelu_new'\]|hidden_act .*gelu_new"):
    convert.load_source(single)
  config['vision_config']['hidden_act'] = 'quick_gelu'
  config['text_config']['intermediate_size'] = 100
  (single / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='text_config.intermediate_size 100 is not 4 x hidden_size'):
    convert.load_source(single)
  (single / 'model.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='no model.safetensors'):
    convert.load_source(single)
