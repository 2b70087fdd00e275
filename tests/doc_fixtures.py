"""The files, folders and services the documented commands name, made by tests/test_docs.py.

Nothing here downloads anything. Images are the built-in drawn scenes
(clip_jax.data.builtin), saved as JPEG/PNG; models are random initialisations exported
with clip_jax's own exporter.

- `checkout(root)`: the root of a checkout, as the README's "from a clone of this
  repository" means it: every top-level entry git knows of, as a symlink to this one.
  `--config=configs/vit_b32.py`, `launch/...` and `benchmarks/...` resolve against the
  current directory, so the commands naming them run from such a root; whatever they
  write (./workdir, runs/, out/) lands in the temporary folder, not in the repository.
- `pairs_csv`, `image_folder`, `photos`: write_shards' CSV (filepath,title) with its
  images; an evaluation folder `class_name/*.jpg` + captions.jsonl (tests/test_eval_data's
  `make_folder`); a folder of photos to embed.
- `img2dataset_tar`: an img2dataset-layout tar of drawn scenes with their captions;
  `wds_tar`: tests/test_data_sources' `write_wds_shard`.
- `url_list(folder, server)`: img2dataset's input, a parquet of URL,TEXT rows, whose
  images `StaticServer` (http.server on 127.0.0.1) serves; some URLs fail as on the web.
- `fake_cifar10`: a TFDS `cifar10` (the registered builder's own features, version and
  class names; 40 train / 20 test drawn images) prepared under `data_dir`.
- `python tests/doc_fixtures.py models OUT`: OpenAI-layout weight files of random models
  (see `make_models`).
- `Buckets`: the GCS emulator (tests/gcs_emulator.py) with every bucket a command names.
- `fake_tools(bin_dir)`: `sbatch` (runs the batch script's own --dry-run), and
  tests/test_launch's `gcloud`, which records every call (a dry run must make none).
"""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
  sys.path.insert(0, str(TESTS))

from gcs_emulator import LoopbackServer  # noqa: E402  (tests/ is on the path from here)

# Never part of a checkout's root as a user clones it.
_NOT_CHECKED_OUT = {'.git', '.venv', '.pytest_cache', 'workdir'}


def checkout(root: pathlib.Path) -> pathlib.Path:
  """Symlinks to the repository's top-level entries (git's list: tracked + untracked, less
  what .gitignore names) in `root`."""
  listed = subprocess.run(['git', '-C', str(REPO), 'ls-files', '--cached', '--others',
                           '--exclude-standard', '-z'], capture_output=True, check=True,
                          timeout=60).stdout.decode().split('\0')
  top = sorted({p.split('/', 1)[0] for p in listed if p} - _NOT_CHECKED_OUT)
  root.mkdir(parents=True, exist_ok=True)
  for name in top:
    if (REPO / name).exists() and not (root / name).exists():
      (root / name).symlink_to(REPO / name)
  return root


# --- images -----------------------------------------------------------------------------

def _scenes(count: int, seed: int, image_size: int = 96):
  from clip_jax.data import builtin
  return list(builtin.scenes(count, seed, held_out=False, image_size=image_size,
                             captions_per_image=1))


def _save(pixels: np.ndarray, path: pathlib.Path) -> None:
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def pairs_csv(folder: pathlib.Path, count: int = 24) -> pathlib.Path:
  """pairs.csv (open_clip's `filepath`,`title` columns) and images/NN.jpg beside it."""
  rows = []
  for i, scene in enumerate(_scenes(count, seed=1)):
    name = f'images/{i:02d}.' + ('png' if i % 4 == 3 else 'jpg')
    _save(scene['image'], folder / name)
    rows.append({'filepath': name, 'title': scene['caption'][0]})
  with open(folder / 'pairs.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['filepath', 'title'])
    writer.writeheader()
    writer.writerows(rows)
  return folder / 'pairs.csv'


def image_folder(folder: pathlib.Path) -> pathlib.Path:
  """class_name/*.jpg|png with captions.jsonl (and one corrupt file, counted as skipped)."""
  from test_eval_data import make_folder
  folder.mkdir(parents=True, exist_ok=True)
  make_folder(folder)
  return folder


def photos(folder: pathlib.Path, count: int = 6) -> pathlib.Path:
  for i, scene in enumerate(_scenes(count, seed=2)):
    _save(scene['image'], folder / f'photo_{i}.jpg')
  return folder


def texts(path: pathlib.Path) -> pathlib.Path:
  path.write_text('a red circle\na small blue square on the left\n')
  return path


def wds_tar(path: pathlib.Path, first: int = 0, count: int = 8) -> bytes:
  """An img2dataset-layout tar (KEY.jpg|png|webp + KEY.txt + KEY.json + KEY.cls)."""
  from test_data_sources import write_wds_shard
  path.parent.mkdir(parents=True, exist_ok=True)
  write_wds_shard(str(path), first, count, bad=set())
  return path.read_bytes()


def img2dataset_tar(path: pathlib.Path, first: int = 0, count: int = 40) -> bytes:
  """img2dataset's webdataset layout: NNNNN.jpg + NNNNN.txt + NNNNN.json per sample, with
  the built-in scenes' varied captions (enough words for a SentencePiece vocabulary)."""
  from PIL import Image
  from test_data_sources import _add_member
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, 'w') as tar:
    for i, scene in enumerate(_scenes(count, seed=10 + first, image_size=64), first):
      key = f'{i:09d}'
      buffer = io.BytesIO()
      Image.fromarray(scene['image']).save(buffer, 'JPEG', quality=90)
      _add_member(tar, f'{key}.jpg', buffer.getvalue())
      _add_member(tar, f'{key}.txt', scene['caption'][0].encode())
      _add_member(tar, f'{key}.json', json.dumps({'key': key, 'status': 'success'}).encode())
  return path.read_bytes()


URL_LIST_SAMPLES = 24
URL_LIST_BROKEN = {3: 404, 11: 404, 17: 'corrupt'}   # downloads img2dataset must drop


def url_list_caption(index: int) -> str:
  return f'photo {index} of a drawn scene'


class StaticServer(LoopbackServer):
  """`with StaticServer(root) as web:` the files under `root` at `web.url` (127.0.0.1)."""

  def __init__(self, root: pathlib.Path):
    self.root = pathlib.Path(root)
    handler = functools.partial(_QuietHandler, directory=str(self.root))
    self._serve(http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):   # the test's output is the command's, not the server's
    pass


def url_list(folder: pathlib.Path, server: StaticServer) -> pathlib.Path:
  """A one-file parquet URL list (columns URL, TEXT) of drawn scenes of varied sizes,
  some larger than img2dataset's --image_size; URL_LIST_BROKEN's answer 404 or corrupt."""
  import pandas as pd
  from PIL import Image
  folder.mkdir(parents=True, exist_ok=True)
  rows = []
  for index, scene in enumerate(_scenes(URL_LIST_SAMPLES, seed=30, image_size=96)):
    name = f'scene_{index:03d}.jpg'
    if URL_LIST_BROKEN.get(index) == 'corrupt':
      (server.root / name).write_bytes(b'\xff\xd8 not a jpeg')
    elif index not in URL_LIST_BROKEN:
      size = (200 + 37 * index, 160 + 29 * (index % 7))   # (width, height), up to 1051 px
      Image.fromarray(scene['image']).resize(size).save(server.root / name, 'JPEG')
    rows.append({'URL': f'{server.url}/{name}', 'TEXT': url_list_caption(index)})
  path = folder / 'part-00000.parquet'
  pd.DataFrame(rows).to_parquet(path)
  return folder


CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                 'ship', 'truck']


def fake_cifar10(data_dir: pathlib.Path, train: int = 40, test: int = 20) -> pathlib.Path:
  """TFDS's own `cifar10` builder (features, version 3.0.2, class names), prepared from
  drawn 32x32 images instead of the download: `tfds.builder('cifar10', data_dir=...)`
  reads it as it would read the real one."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import cifar
  rng = np.random.default_rng(3)
  pictures = {split: [(i % 10, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                      for i in range(count)] for split, count in (('train', train),
                                                                   ('test', test))}

  class PreparedCifar10(cifar.Cifar10, skip_registration=True):
    name = 'cifar10'

    def _split_generators(self, dl_manager):
      self.info.features['label'].names = CIFAR10_NAMES
      return {tfds.Split.TRAIN: self._examples('train'), tfds.Split.TEST: self._examples('test')}

    def _examples(self, split):
      for i, (label, image) in enumerate(pictures[split]):
        yield i, {'id': f'{split}_{i:05d}', 'image': image, 'label': label}

  builder = PreparedCifar10(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  return pathlib.Path(builder.data_dir)


# --- models -----------------------------------------------------------------------------

def small_vit_config():
  """A ViT with OpenAI's layout, tokenizer (CLIP BPE, 49,408 ids, 77 tokens) and 224 px
  input, 2+2 layers of width 128: 64-wide heads, as the importer infers them (width // 64)."""
  from clip_jax.models import model_config
  return model_config(
      'ViT-B/32', embed_dim=64,
      vision=dict(type='vit', image_size=224, patch_size=32, width=128, layers=2, heads=2),
      text=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))


def _random(cfg, seed: int):
  import jax
  from clip_jax.models import build_model, init_variables
  return jax.jit(lambda rng: init_variables(build_model(cfg), cfg, rng))(jax.random.key(seed))


def _export_openai(cfg, variables, out: pathlib.Path, dtype: str) -> None:
  """Only the weight file (the exporter writes open_clip_config.json beside it too)."""
  from clip_jax import convert
  staging = out.parent / f'.staging_{out.name}'
  staging.mkdir(parents=True, exist_ok=True)
  convert.export_openai(cfg, variables, staging / out.name, dtype=dtype)
  os.replace(staging / out.name, out)
  shutil.rmtree(staging)


def make_models(out: pathlib.Path, which: list[str]) -> None:
  """full: full/ViT-B-32.pt, a random ViT-B/32 in float16 (OpenAI's released dtype; the
  exact architecture, which open_clip.create_model('ViT-B-32-quickgelu') needs).
  small: small/ViT-B-32.pt (float16), small/open_clip_vit_b32.safetensors (float32) and
  small/clip-vit-base-patch32/ (a Hugging Face CLIPModel directory) of `small_vit_config`."""
  from clip_jax import convert
  if 'full' in which:
    import clip_jax
    model = clip_jax.load('ViT-B/32', seed=0)
    (out / 'full').mkdir(parents=True, exist_ok=True)
    _export_openai(model.config, model.variables, out / 'full' / 'ViT-B-32.pt', 'float16')
  if 'small' in which:
    cfg = small_vit_config()
    variables = _random(cfg, seed=1)
    small = out / 'small'
    small.mkdir(parents=True, exist_ok=True)
    _export_openai(cfg, variables, small / 'ViT-B-32.pt', 'float16')
    gelu = small_vit_config()
    gelu.activation = 'gelu'
    _export_openai(gelu, _random(gelu, seed=2), small / 'open_clip_vit_b32.safetensors',
                   'float32')
    convert.export_hf(cfg, _random(cfg, seed=3), small / 'clip-vit-base-patch32')


# --- GCS --------------------------------------------------------------------------------

class Buckets:
  """The GCS emulator with any number of buckets; `upload(bucket, name, data)`."""

  def __init__(self, emulator):
    self.emulator = emulator
    self.made = {emulator.bucket}
    self._lock = threading.Lock()

  def ensure(self, bucket: str) -> None:
    with self._lock:
      if bucket in self.made:
        return
      request = urllib.request.Request(
          f'{self.emulator.url}/storage/v1/b?project=clip-jax-test',
          data=json.dumps({'name': bucket}).encode(), method='POST',
          headers={'Content-Type': 'application/json'})
      try:
        with urllib.request.urlopen(request) as r:
          r.read()
      except urllib.error.HTTPError as error:
        if error.code != 409:   # 409: it exists already
          raise
      self.made.add(bucket)

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    self.ensure(bucket)
    self.emulator.upload(name, data, bucket=bucket)

  def download(self, bucket: str, name: str) -> bytes:
    return self.emulator.download(name, bucket=bucket)

  def list_objects(self, bucket: str, prefix: str = '') -> list[str]:
    self.ensure(bucket)
    return self.emulator.list_objects(prefix, bucket=bucket)


# --- stand-ins for cluster tools --------------------------------------------------------

# sbatch: its own options (--nodes=4, -N 4, ...) up to the script, then the script's
# arguments. SLURM would queue the script and run it on the first node with SLURM_*
# set; here it runs at once with a made-up allocation, through the script's --dry-run,
# which prints the srun command the job would run.
FAKE_SBATCH = r'''#!/usr/bin/env bash
set -euo pipefail
nodes=2
while (($#)) && [[ "$1" == -* ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    -N) nodes="$2"; shift ;;
  esac
  shift
done
script="$1"; shift
echo "fake sbatch: ${script} on ${nodes} nodes, through its --dry-run" >&2
export SLURM_JOB_ID=4242 SLURM_NNODES="${nodes}" SLURM_SUBMIT_DIR="${PWD}" \
  SLURM_JOB_NODELIST="node-[001-$(printf '%03d' "${nodes}")]"
exec bash "${script}" --dry-run "$@"
'''

def fake_tools(bin_dir: pathlib.Path) -> pathlib.Path:
  """`sbatch` (above) and tests/test_launch's recording `gcloud` in `bin_dir`; returns the
  file gcloud logs its calls to (a dry run of the launch scripts must call nothing)."""
  from test_launch import _fake_gcloud
  bin_dir.mkdir(parents=True, exist_ok=True)
  sbatch = bin_dir / 'sbatch'
  sbatch.write_text(FAKE_SBATCH)
  sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
  _, log = _fake_gcloud(bin_dir, states=[], jobs=[])   # writes bin_dir/gcloud
  return log


def tar_members(data: bytes) -> list[str]:
  with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    return tar.getnames()


if __name__ == '__main__':
  if sys.argv[1] == 'models':
    make_models(pathlib.Path(sys.argv[2]), sys.argv[3:] or ['full', 'small'])
  elif sys.argv[1] == 'cifar10':
    print(fake_cifar10(pathlib.Path(sys.argv[2])))
  else:
    sys.exit(f'unknown: {sys.argv[1:]}')
