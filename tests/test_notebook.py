"""notebooks/colab_tpu_demo.ipynb runs top to bottom (a short run on the CPU, here with
the 8 fake devices of conftest.py) and shows what it promises: the mesh, training, the
zero-shot figure, the PyTorch export agreeing with JAX, the OpenAI import command."""

import base64
import io
import pathlib
import re

import nbformat
import numpy as np
import papermill
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'colab_tpu_demo.ipynb'
SHORT_RUN = dict(TRAIN_STEPS=20, BATCH_SIZE=64, NUM_TRAIN=512, NUM_SHOWN=16)


def _outputs(cell):
  text = ''.join(o.get('text', '') for o in cell.get('outputs', []) if o['output_type'] == 'stream')
  images = [o['data']['image/png'] for o in cell.get('outputs', [])
            if o['output_type'] in ('display_data', 'execute_result') and 'image/png' in o['data']]
  return text, images


def test_notebook_is_committed_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert 'parameters' in code[0].metadata.get('tags', [])   # papermill's injection point
  for name in SHORT_RUN:
    assert re.search(rf'^{name} = ', code[0].source, re.M), name


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  # The kernel imports this checkout (CI installs it with pip -e; here it is on the path).
  monkeypatch.setenv('PYTHONPATH', str(REPO))
  # As on Colab: the kernel starts in an empty folder of its own (/content there), and the
  # notebook's own WORKDIR ('clip_jax_demo', relative) is used; only the sizes are changed.
  content = tmp_path / 'content'
  content.mkdir()
  executed = tmp_path / 'executed.ipynb'
  papermill.execute_notebook(
      str(NOTEBOOK), str(executed), kernel_name='python3', cwd=str(content),
      parameters=SHORT_RUN, progress_bar=False, execution_timeout=600)
  cells = [c for c in nbformat.read(executed, as_version=4).cells if c.cell_type == 'code']
  text = '\n'.join(_outputs(c)[0] for c in cells)

  assert re.search(r"mesh: \{'data': 8, 'fsdp': 1, 'model': 1\}", text), text
  assert 'a global batch of 64 puts 8 examples on each device' in text
  assert f"trained to step {SHORT_RUN['TRAIN_STEPS']}" in text
  assert re.search(r'zero-shot on these 16 held-out images: \d+% right \(chance 3%\)', text), text
  assert 'zero-shot top-1 on held-out:' in text   # the trainer's own evaluation

  # The zero-shot figure: 16 pictures in 2 rows of 8 captioned cells.
  figures = [image for cell in cells for image in _outputs(cell)[1]]
  assert len(figures) == 1, 'expected exactly the zero-shot figure (no internet: no OpenAI one)'
  figure = Image.open(io.BytesIO(base64.b64decode(figures[0])))
  assert figure.size == (8 * 128, 2 * (128 + 30))
  # Captions are written in green (right) or red (wrong) on white under the pictures.
  strip = np.asarray(figure.convert('RGB').crop((0, 128, 8 * 128, 158)), np.int32)
  r, g, b = strip[..., 0], strip[..., 1], strip[..., 2]
  coloured_text = ((g - r > 60) & (g - b > 60)) | ((r - g > 80) & (r - b > 80))
  assert coloured_text.sum() > 100
  assert (strip == 255).all(-1).mean() > 0.5   # mostly white background

  agree = re.search(r'PyTorch predicts the same pair as JAX for (\d+) of 16 images', text)
  assert agree and int(agree.group(1)) >= 15, text
  difference = re.search(r'largest image-feature difference: (\S+)', text)
  assert difference and float(difference.group(1)) < 1e-4, text
  assert 'clip_jax.convert import --source' in text and 'No internet here' in text
  # Everything the run wrote is in the notebook's relative WORKDIR.
  assert sorted(p.name for p in content.iterdir()) == ['clip_jax_demo']
  assert (content / 'clip_jax_demo' / 'checkpoints').is_dir()
  assert (content / 'clip_jax_demo' / 'pytorch_hf' / 'model.safetensors').is_file()
