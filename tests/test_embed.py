"""python -m clip_jax.embed and python -m clip_jax.evaluate on a saved workdir, 8 fake devices."""

import json
import subprocess
import sys

import numpy as np
import pytest

from clip_jax.api import ClipModel
from clip_jax import embed
from clip_jax.checkpoint import save_model
from clip_jax.config import get_config
from clip_jax.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate.datasets import load_image
from clip_jax.models import model_config
from test_eval_data import make_folder
from test_eval_features import random_variables


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny model saved as a workdir, a SentencePiece tokenizer and an image folder."""
  root = tmp_path_factory.mktemp('embed')
  model = ClipModel(model_config('tiny'), random_variables(model_config('tiny'), seed=3))
  workdir = root / 'run'
  save_model(str(workdir), get_config('tiny'), model.variables)
  corpus = [f'a {c} {s} on the {p}' for c in ('red', 'green', 'blue', 'deep blue')
            for s in ('picture', 'square', 'thing') for p in ('left', 'right', 'top')]
  spm = train_sentencepiece(corpus * 5, str(root / 'spm'), vocab_size=60)
  make_folder(root / 'pics')
  return dict(root=root, model=model, workdir=str(workdir), spm=spm, pics=root / 'pics')


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_embed_images_matches_the_model_and_names_rows(run, capsys):
  out = embed.main(['--workdir', run['workdir'], '--images', str(run['pics']),
                    '--out', str(run['root'] / 'vectors'), '--batch_size', '8'])
  assert out.endswith('vectors.npy')
  vectors = np.load(out)
  names = (run['root'] / 'vectors.txt').read_text().splitlines()
  assert vectors.shape == (12, 64) and len(names) == 12 and 'red/broken.jpg' not in names
  assert names == sorted(names)
  pixels = np.stack([load_image(str(run['pics'] / n), 32) for n in names])
  np.testing.assert_allclose(vectors, _unit(run['model'].encode_image(pixels)), atol=1e-5)
  printed = capsys.readouterr().out
  assert 'skipped unreadable image' in printed and 'embedded 12 images (1 skipped)' in printed
  assert 'vectors.npy' in printed


def test_embed_texts_with_a_sentencepiece_tokenizer(run):
  captions = run['root'] / 'captions.txt'
  captions.write_text('a red square\n\na green thing on the left\nblue\n' + 'a red picture\n' * 9)
  out = str(run['root'] / 'texts.npy')
  embed.main(['--workdir', run['workdir'], '--texts', str(captions), '--out', out,
              '--tokenizer', run['spm'], '--batch_size', '5', '--no_normalize'])   # -> 8
  vectors = np.load(out)
  lines = [l for l in captions.read_text().splitlines() if l]
  assert vectors.shape == (12, 64)
  tokens = SentencePieceTokenizer(run['spm'], 16)(lines)
  np.testing.assert_allclose(vectors, run['model'].encode_text(tokens), atol=1e-4)
  assert (run['root'] / 'texts.txt').read_text().splitlines() == lines


def test_embed_and_evaluate_fail_clearly(run):
  with pytest.raises(ValueError, match='--tokenizer: this model has no known tokenizer'):
    embed.main(['--workdir', run['workdir'], '--texts', __file__, '--out', '/tmp/x.npy'])
  with pytest.raises(SystemExit):        # argparse: one of --images / --texts only
    embed.parse_args(['--source', 'tiny', '--images', 'a', '--texts', 'b', '--out', 'x'])
  with pytest.raises(SystemExit):
    evaluate_cli.parse_args(['--source', 'tiny', '--task', 'nonsense', '--dataset', 'builtin'])
  with pytest.raises(FileNotFoundError, match='no such file; expected captions'):
    embed.main(['--workdir', run['workdir'], '--texts', str(run['root'] / 'missing.txt'),
                '--out', '/tmp/x.npy', '--tokenizer', run['spm']])


def test_evaluate_cli_writes_json_in_the_workdir(run, capsys):
  results = evaluate_cli.main([
      '--workdir', run['workdir'], '--task', 'zeroshot,retrieval,linear_probe',
      '--dataset', f'folder:{run["pics"]}', '--train_split', 'test', '--tokenizer', run['spm'],
      '--batch_size', '8', '--templates', 'generic'])
  saved = json.loads((run['root'] / 'run' / 'eval_results.json').read_text())
  assert saved['metrics'] == pytest.approx(results)
  assert {'zeroshot/pics/top1', 'retrieval/pics/text_to_image_R5',
          'linear_probe/pics/accuracy'} <= set(results)
  printed = capsys.readouterr().out
  assert '| task | dataset | metric | value |' in printed and 'eval_results.json' in printed
  assert len(list((run['root'] / 'run' / 'eval_cache').glob('zeroshot_*.npy'))) == 1


@pytest.mark.parametrize('module', ['clip_jax.evaluate', 'clip_jax.embed'])
def test_command_line_help(module):
  done = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True,
                        check=True, timeout=120)
  assert f'python -m {module}' in done.stdout and '--source' in done.stdout


def test_evaluation_imports_neither_tensorflow_nor_torch():
  """Accelerator hosts may lack both: only TFDS/shard datasets load tensorflow, lazily."""
  code = ('import sys, clip_jax.evaluate, clip_jax.embed, clip_jax.evaluate.__main__; '
          'print(sorted(m for m in ("tensorflow", "torch", "sklearn") if m in sys.modules))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=True, timeout=120)
  assert done.stdout.strip() == '[]'
