"""The README's path, as a user types it: in an empty directory, relative paths only.

Train briefly (the first README command, shortened) -> evaluate -> export to the OpenAI
and Hugging Face layouts -> import the exports again -> clip_jax.load the workdir, the
exports and the imports -> embed captions. Every step is its own `python ...` process
run from that directory; the files land where the relative paths say.
"""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

LOAD_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'load_check.py')
TOKENIZER = 'workdir/builtin_data/tokenizer.model'

# The README's lines (Quickstart, Evaluate, From PyTorch / to PyTorch, Use a model), with
# the names of this run. `python` is the interpreter running the tests.
COMMANDS = [
    'python -m clip_jax.main --config.total_steps=20',
    'python -m clip_jax.evaluate --workdir=./workdir --task=zeroshot --dataset=builtin',
    'python -m clip_jax.convert export --workdir workdir --format openai --out out/m.safetensors',
    'python -m clip_jax.convert export --workdir workdir --format hf --out out/hf_tiny',
    'python -m clip_jax.convert import --source out/hf_tiny/ --workdir runs/hf_tiny',
    'python -m clip_jax.convert import --source out/m.safetensors --workdir runs/openai_tiny',
    f'python {LOAD_CHECK} {TOKENIZER} ./workdir hf=out/hf_tiny hf=runs/hf_tiny '
    'openai=out/m.safetensors openai=runs/openai_tiny',
    'python -m clip_jax.embed --workdir=workdir --texts=captions.txt --out=texts.npy',
]


def test_the_readme_sequence_with_relative_paths(tmp_path):
  (tmp_path / 'captions.txt').write_text('a red circle\na small blue square on the left\n')
  outputs = []
  for command in COMMANDS:
    words = shlex.split(command)
    result = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f'{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    outputs.append(result.stdout)
  train, evaluate, export_openai, export_hf, import_hf, import_openai, load, embed = outputs

  assert f'workdir: {tmp_path}/workdir\n' in train
  assert 'zero-shot top-1 on held-out:' in train
  assert f'written to {tmp_path}/workdir/eval_results.json' in evaluate
  assert f'wrote {tmp_path}/out/m.safetensors' in export_openai
  assert f'wrote {tmp_path}/out/hf_tiny/model.safetensors' in export_hf
  assert "load it with clip_jax.load('runs/hf_tiny')" in import_hf
  assert "load it with clip_jax.load('runs/openai_tiny')" in import_openai
  assert load.splitlines() == [
      'same image and text features: out/hf_tiny', 'same image and text features: runs/hf_tiny',
      'same parameters: out/m.safetensors', 'same parameters: runs/openai_tiny']
  assert f'-> {tmp_path}/texts.npy' in embed
  embeddings = np.load(tmp_path / 'texts.npy')
  assert embeddings.shape == (2, 64)
  assert (tmp_path / 'texts.txt').read_text().splitlines()[0] == 'a red circle'
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'captions.txt', 'out', 'runs', 'texts.npy', 'texts.txt', 'workdir']
  assert (tmp_path / 'workdir' / 'eval_cache').is_dir()   # evaluate's classifier cache
