"""The documentation is the test: every command of README.md, docs/*.md and the configs'
docstrings runs here as documented (tests/doc_commands.py extracts them), one test each,
with the files it names made first (tests/doc_fixtures.py).

A command runs verbatim, in `bash -c` (a Python snippet: `python -c`), from a new
temporary folder, with only shrinking flags appended (steps, batch sizes, example
counts). Each command's recipe (RECIPES, first matching regex wins) says:
- how it runs: `real`; `dry_run` (the trainer's `--dry_run`, for commands meant for a
  TPU pod or GPU cluster: the config, every input, the mesh and the workdir are checked,
  nothing is trained); `launch_dry_run` (the launch scripts' own dry run, DRY_RUN=1, with
  tests/test_launch's recording gcloud on PATH, which must not be called); `ci` (run by
  .ci/run itself: asserted here that .ci/run reads it from README.md); `installed` (a
  `pip install` line: the packages must be in the test environment, since nothing is
  downloaded at test time); `covered` (run by another test, named and asserted to exist);
- where (each folder with its own fresh $HOME beside it): `main`, the root of a checkout (doc_fixtures.checkout: symlinks to this
  repository's top-level entries) shared by the README's and the guides' commands in
  documented order, so that evaluate/export/embed find what train/import wrote
  (`main_wds`: another checkout root, for the run on your own shards); `gcs`, an empty
  folder for the gs:// commands (nothing may land in it); `cifar`, an empty folder whose
  $HOME holds `~/tensorflow_datasets`;
- `needs`: files and folders made in that folder first, or other documented commands that
  must have run there first (`after`).
A command with no recipe fails: a new line in the docs cannot go untested.

Every command runs with its folder's own HOME, the fake cluster tools first on PATH,
the GCS emulator's settings (tests/gcs_emulator.py; every bucket a command names is
created in it), XLA's 8 fake CPU devices of the other tests removed (a user's machine has
one CPU device), and downloads switched off (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1,
NO_ALBUMENTATIONS_UPDATE=1). gs:// names must be valid GCS bucket names: GCS and
tensorstore (orbax's checkpoint writer) refuse others, so such a command fails here
without being run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

import doc_commands
import doc_fixtures
from doc_commands import DocCommand

REPO = doc_commands.REPO
COMMANDS = doc_commands.all_commands()

# configs/tiny.py's command: the run that the commands after it read (./workdir, DIR),
# shortened and on fewer built-in scenes.
TINY_RUN = r'^python -m clip_jax\.main --config=configs/tiny\.py --workdir=\./workdir$'
TINY_SHRINK = ('--config.total_steps=2', '--config.batch_size=32',
               '--config.builtin.num_train=512', '--config.eval.max_examples=64')


@dataclasses.dataclass(frozen=True)
class Recipe:
  pattern: str                                  # regex, searched in the command
  how: str = 'real'                             # real | dry_run | launch_dry_run | ci | installed | covered
  folder: str = 'main'                          # main, main_* (checkout roots) | gcs | cifar
  needs: tuple[str, ...] = ()                   # PRODUCTS made in the folder first
  after: tuple[str, ...] = ()                   # regexes of documented commands run first
  append: tuple[str, ...] = ()                  # shrinking flags
  env: tuple[tuple[str, str], ...] = ()
  prelude: str = ''                             # python snippets: names the snippet uses
  expect: tuple[str, ...] = ()                  # regexes the output must match
  check: Callable | None = None                 # check(result, folder, docs) -> None
  covered_by: str = ''                          # how='covered': tests/test_x.py::test_name
  parallel: bool = False                        # shares no files with the others: may run early
  documented_exit: str = ''                     # a non-zero exit the docs state: regex its stderr ends with
  timeout: int = 600


def _files(*paths: str) -> Callable:
  def check(result, folder, docs):
    missing = [p for p in paths if not (folder / p).exists()]
    assert not missing, f'not written where the relative path says: {missing} in {folder}'
  return check


def _in_bucket(*names: str) -> Callable:
  """The objects are in the command's bucket, and nothing landed in the folder it ran in."""
  def check(result, folder, docs):
    bucket = sorted(doc_commands.gs_buckets(result.command))[0]
    present = docs.buckets.list_objects(bucket)
    missing = [n for n in names if not any(p == n or p.startswith(n + '/') for p in present)]
    assert not missing, f'not in gs://{bucket}: {missing} (it holds {present[:20]})'
    assert list(folder.iterdir()) == [], f'a gs:// command wrote into its cwd: {list(folder.iterdir())}'
  return check


def _nothing_called(result, folder, docs):
  calls = docs.gcloud_log.read_text().splitlines() if docs.gcloud_log.exists() else []
  assert not calls, f'a dry run called gcloud: {calls}'
  assert re.search(r'^\+ ', result.output, re.M), 'the dry run printed no command'


def _watch_log(result, folder, docs):
  log = (folder / 'watch.log').read_text()
  assert 'dry run: one pass shown' in log and re.search(r'^\+ ', log, re.M), log[-3000:]
  _nothing_called(Result('', folder, 0, '+ (see watch.log)', '', 0.0), folder, docs)


def _img2dataset_shards(result, folder, docs):
  """img2dataset wrote every downloadable sample into the bucket, in the layout clip_jax's
  `wds` source reads (doc_fixtures.URL_LIST_SAMPLES, less the 404s and the corrupt one),
  the images resized as the flags say; nothing landed in the cwd but its URL list."""
  import io
  import tarfile
  from PIL import Image
  names = docs.buckets.list_objects('my-bucket', 'laion400m/')
  shards = [n for n in names if n.endswith('.tar')]
  assert shards == ['laion400m/00000.tar'], names
  with tarfile.open(fileobj=io.BytesIO(docs.buckets.download('my-bucket', shards[0]))) as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  keys = sorted({name.rsplit('.', 1)[0] for name in members})
  expected = doc_fixtures.URL_LIST_SAMPLES - len(doc_fixtures.URL_LIST_BROKEN)
  assert len(keys) == expected, (len(keys), sorted(members)[:12])
  captions = set()
  for key in keys:
    image = Image.open(io.BytesIO(members[f'{key}.jpg']))
    assert min(image.size) <= 256, (key, image.size)  # --image_size=256 --resize_mode=keep_ratio
    captions.add(members[f'{key}.txt'].decode())
  assert captions == {doc_fixtures.url_list_caption(i) for i in range(doc_fixtures.URL_LIST_SAMPLES)
                      if i not in doc_fixtures.URL_LIST_BROKEN}, captions
  assert sorted(p.name for p in folder.iterdir()) == ['laion400m-meta'], list(folder.iterdir())


# Heavy lines of the README are the users' first steps: they run for real, shrunk.
RECIPES: list[Recipe] = [
    # --- README: Quickstart (run by .ci/run itself) ------------------------------------
    Recipe(r'^python3 -m venv \.venv && .* python -m (clip_jax\.main|pytest)$', how='ci'),

    # --- configs/*.py: the CPU variants (`:local`), then the paper recipes (and the
    # README's Train line, the same command with more flags), for a pod: --dry_run ------
    # The full architectures on one CPU (160 s of CPU for ViT-B/32's 2 steps, far more for
    # the large ones) are run by tests/test_arch_configs.py, which checks that each
    # docstring holds the command (in CI one per family, RN50 and ViT-B/32; all nine with
    # CLIP_JAX_TEST_ALL_ARCHITECTURES=1); CLIP_JAX_DOCS_LOCAL=run runs them here too.
    Recipe(r'^python -m clip_jax\.main --config=configs/\w+\.py:local\b',
           how='real' if os.environ.get('CLIP_JAX_DOCS_LOCAL') == 'run' else 'covered',
           covered_by='tests/test_arch_configs.py::test_local_variant_trains_two_steps',
           append=('--config.total_steps=2',), timeout=1800),
    Recipe(TINY_RUN, append=TINY_SHRINK,
           expect=(r'zero-shot top-1 on held-out: [\d.]+% \(chance 2\.8%\)',),
           check=_files('workdir/config.json', 'workdir/checkpoints', 'workdir/metrics.jsonl')),
    Recipe(r'^python -m clip_jax\.main --config=configs/\w+\.py --workdir=gs://', how='dry_run',
           needs=('gs_data',), expect=(r'Every check passed; nothing was trained',),
           parallel=True),

    # --- README: Train, shards --------------------------------------------------------
    Recipe(r"^python -m clip_jax\.main --config=configs/tiny\.py --workdir=\./my_run "
           r"--config\.data\.train\.pattern='shards/\{00000\.\.00004\}\.tar'$",
           folder='main_wds', needs=('shards/{00000..00004}.tar',),
           append=('--config.total_steps=2', '--config.batch_size=32'),
           check=_files('my_run/tokenizer', 'my_run/checkpoints'), parallel=True),
    Recipe(r'^python -m clip_jax\.data\.write_shards --input pairs\.csv --output shards/',
           needs=('pairs.csv',), expect=(r'wrote 24 records to \d+ shards',),
           check=_files('shards'), parallel=True),
    Recipe(r'^python -m clip_jax\.data\.train_tokenizer --help', expect=('--output_prefix',)),

    # --- README: Storage (gs://), in an empty folder that must stay empty ---------------
    Recipe(r'^python -m clip_jax\.main --workdir=gs://[\w-]+/runs/tiny$', folder='gcs',
           append=TINY_SHRINK, expect=(r'zero-shot top-1 on held-out:',),
           check=_in_bucket('runs/tiny/config.json', 'runs/tiny/checkpoints', 'runs/tiny/metrics.jsonl'),
           parallel=True),
    Recipe(r'^python -m clip_jax\.evaluate --workdir=gs://[\w-]+/runs/tiny ', folder='gcs',
           after=(r'^python -m clip_jax\.main --workdir=gs://',), append=('--max_examples=64',),
           expect=(r'written to gs://\S+/runs/tiny/eval_results\.json',),
           check=_in_bucket('runs/tiny/eval_results.json')),
    Recipe(r'^python -m clip_jax\.convert export --workdir gs://\S+ --format hf --out gs://',
           folder='gcs', after=(r'^python -m clip_jax\.main --workdir=gs://',),
           expect=(r'wrote gs://\S+/hf_tiny/model\.safetensors',),
           check=_in_bucket('hf_tiny/model.safetensors', 'hf_tiny/config.json')),
    Recipe(r'^python -c "import clip_jax; clip_jax\.load\(\'gs://', folder='gcs',
           after=(r'^python -m clip_jax\.main --workdir=gs://',), check=_in_bucket()),

    # --- README: Use a model; From PyTorch / to PyTorch --------------------------------
    # The snippet uses `pixels` and `token_ids` without making them: the prelude does.
    Recipe(r"clip_jax\.load\('ViT-B/32', seed=0\)", needs=('workdir', 'ViT-B-32.pt'),
           prelude=('import numpy as np\n'
                    'from clip_jax.data.tokenizers import ClipBpeTokenizer\n'
                    'pixels = np.zeros((2, 224, 224, 3), np.float32)\n'
                    "token_ids = ClipBpeTokenizer()(['a photo of a cat', 'a dog'])\n")),
    Recipe(r'^python -m clip_jax\.convert import --source ViT-B-32\.pt --workdir runs/vit_b32$',
           needs=('ViT-B-32.pt',), expect=(r'architecture ViT-B/32: ',),
           check=_files('runs/vit_b32/config.json')),
    Recipe(r'^python -m clip_jax\.convert import --source open_clip_vit_b32\.safetensors ',
           needs=('open_clip_vit_b32.safetensors',), expect=(r'activation gelu',),
           check=_files('runs/oc_b32/config.json')),
    Recipe(r'^python -m clip_jax\.convert import --source clip-vit-base-patch32/ ',
           needs=('clip-vit-base-patch32/',), check=_files('runs/hf_b32/config.json')),
    Recipe(r'^python -m clip_jax\.convert export --workdir runs/vit_b32 --format openai ',
           after=(r'convert import --source ViT-B-32\.pt',),
           check=_files('out/vit_b32.safetensors', 'out/open_clip_config.json')),
    Recipe(r'^python -m clip_jax\.convert export --workdir runs/vit_b32 --format hf ',
           after=(r'convert import --source ViT-B-32\.pt',),
           check=_files('out/hf_vit_b32/model.safetensors', 'out/hf_vit_b32/config.json')),
    Recipe(r'^import open_clip, transformers\n',
           after=(r'convert export --workdir runs/vit_b32 --format openai ',
                  r'convert export --workdir runs/vit_b32 --format hf ')),

    # --- README: Evaluate ---------------------------------------------------------------
    Recipe(r'^python -m clip_jax\.evaluate --workdir=\./workdir --task=zeroshot --dataset=builtin$',
           needs=('workdir',), append=('--max_examples=64',),
           check=_files('workdir/eval_results.json', 'workdir/eval_cache')),
    Recipe(r'^python -m clip_jax\.evaluate --source=ViT-B-32\.pt .*--dataset=tfds:cifar10 ',
           folder='cifar', needs=('small:ViT-B-32.pt', '~/tensorflow_datasets/cifar10'),
           append=('--batch_size=32',),
           expect=(r'\| zeroshot \| cifar10 \| top1 \|', r'\| linear_probe \| cifar10 \| accuracy \|'),
           check=_files('eval_results.json'), parallel=True),
    Recipe(r'^python -m clip_jax\.evaluate --workdir=DIR --task=retrieval --dataset=folder:coco_val/$',
           needs=('DIR', 'coco_val/'), expect=(r'\| retrieval \| coco_val \| image_to_text_R@?1 \|',)),
    Recipe(r'^python -m clip_jax\.embed --workdir=DIR --images=photos/ --out=photos\.npy$',
           needs=('DIR', 'photos/'), check=_files('photos.npy')),

    # --- README: Evaluation suite (DataComp's sets are not downloaded here: the tests that
    # run these commands build sets in the same layout) -------------------------------------
    Recipe(r'^python -m clip_jax\.evaluate --workdir=\S+ --suite=datacomp --data_root=gs://',
           how='covered', covered_by='tests/test_suite.py::test_the_suite_reads_and_writes_gs'),
    Recipe(r'^python -m clip_jax\.evaluate --workdir=\S+ --task=zeroshot --dataset=wds:',
           how='covered', covered_by='tests/test_wds_eval.py::test_the_evaluate_cli_scores_wds_sets'),

    # --- README: Benchmarks -------------------------------------------------------------
    # ViT-B/16's depth cut to one block per tower: the full model's train step takes
    # minutes to compile and run on 2 CPU cores; widths, patching and the code path stay.
    Recipe(r'^python -m clip_jax\.benchmark --config=configs/vit_b16\.py ',
           append=('--batch_per_device=1', '--steps=1', '--warmup=0',
                   '--config.model.vision.layers=1', '--config.model.text.layers=1'),
           expect=(r'"model": "ViT-B/16"',), parallel=True),
    Recipe(r'^python benchmarks/vs_open_clip\.py ', append=('--steps=2', '--rounds=1'),
           expect=(r'ratio clip_jax/open_clip step time: ',), parallel=True),
    Recipe(r'^python benchmarks/loss_memory\.py$',
           append=('--batches=64,128', '--local_batch=8', '--device_counts=8'),
           expect=(r'\| ring \| 8 \|',), parallel=True),
    Recipe(r'^python -m clip_jax\.data\.throughput$',
           append=('--num_images=64', '--num_batches=2', '--batch_size=16'),
           expect=(r'images/s',), parallel=True),

    # --- docs/gpu_cluster.md --------------------------------------------------------------
    # sbatch is the stand-in of doc_fixtures.FAKE_SBATCH: the script's own --dry-run.
    Recipe(r'^sbatch --nodes=\d+ launch/gpu/slurm\.sbatch ',
           expect=(r'srun --kill-on-bad-exit=1 .*bash launch/gpu/launch\.sh -- --config=',)),
    Recipe(r'^bash launch/gpu/slurm\.sbatch --dry-run ', expect=(r'^srun .*launch/gpu/launch\.sh',)),
    Recipe(r'^launch/gpu/launch\.sh ', how='launch_dry_run',
           expect=(r'CLIP_JAX_COORDINATOR_ADDRESS=10\.0\.0\.1:12345',)),

    # --- docs/tpu_pod.md ------------------------------------------------------------------
    # img2dataset, as documented, on a URL list served from 127.0.0.1 into the emulator's
    # bucket (doc_fixtures.url_list: 2 of its URLs answer 404 and 1 a corrupt JPEG).
    Recipe(r'^pip install img2dataset gcsfs$', how='installed'),
    Recipe(r'^img2dataset --url_list=laion400m-meta ', folder='gcs', needs=('laion400m-meta',),
           documented_exit=r"FileNotFoundError: \['my-bucket/laion400m/_tmp'\]\s*$",
           check=_img2dataset_shards, timeout=900),
    # In the background, its output in watch.log (the harness waits for it).
    Recipe(r'^nohup launch/tpu/watch\.sh .*> watch\.log 2>&1 &$', how='launch_dry_run',
           check=_watch_log),
    Recipe(r'^launch/tpu/\w+\.sh\b', how='launch_dry_run', check=_nothing_called),
]


def recipe_for(command: DocCommand) -> Recipe | None:
  for recipe in RECIPES:
    if re.search(recipe.pattern, command.text, re.S):
      return recipe
  return None


# --- running ----------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  command: str            # as run (with appended flags)
  cwd: pathlib.Path
  returncode: int
  stdout: str
  stderr: str
  seconds: float
  error: str = ''         # why it could not run, if it did not
  cpu_seconds: float = 0.0

  @property
  def output(self) -> str:
    return self.stdout + '\n' + self.stderr

  def failure(self, documented: str) -> str:
    return (f'documented command failed (exit {self.returncode}):\n  {documented}\n'
            f'run as:\n  {self.command}\nin {self.cwd}\n{self.error}\n'
            f'--- stdout (last 3000) ---\n{self.stdout[-3000:]}\n'
            f'--- stderr (last 3000) ---\n{self.stderr[-3000:]}')


def _base_env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPU_', 'CLIP_JAX_', 'SLURM_', 'DRY_RUN', 'WATCH_', 'JAX_LOCAL',
                              'PYTEST_'))}
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = flags.strip()
  if not env['XLA_FLAGS']:
    del env['XLA_FLAGS']
  env.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', NO_ALBUMENTATIONS_UPDATE='1',
             PYTHONUNBUFFERED='1')
  return env


class Docs:
  """Shared folders, products, the emulator, and every command's result (each run once).

  Commands whose recipe says `parallel` (they share no files with the others) and the
  expensive products are also taken, in the background, by `workers` threads, so that
  two processes run at once on a 2-core machine; a test whose command is running in the
  background waits for it, one whose command has not started runs it itself.
  """

  def __init__(self, tmp_factory, workers: int = 1):
    self.tmp = tmp_factory
    self.folders: dict[str, pathlib.Path] = {}
    self.made: set[tuple[str, str]] = set()
    self.results: dict[str, Result] = {}
    self._locks: dict[str, threading.Lock] = {}
    self._guard = threading.Lock()
    self.bin = tmp_factory.mktemp('doc_bin')
    self.gcloud_log = doc_fixtures.fake_tools(self.bin)
    self.models_dir = tmp_factory.mktemp('doc_models')
    self._emulator = None
    self._web = None
    self._buckets = None
    self._stop = threading.Event()
    self._queue: list[Callable[[], object]] = []
    self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

  def start_background(self, jobs: list[Callable[[], object]]) -> None:
    self._queue = list(jobs)
    for thread in self._threads:
      thread.start()

  def _work(self) -> None:
    while not self._stop.is_set():
      with self._guard:
        if not self._queue:
          return
        job = self._queue.pop(0)
      try:
        job()
      except BaseException:  # pylint: disable=broad-except  (the test that needs it reports it)
        pass

  def close(self) -> None:
    self._stop.set()
    for thread in self._threads:
      if thread.is_alive():
        thread.join()
    if self._emulator is not None:
      self._emulator.__exit__(None, None, None)
    if self._web is not None:
      self._web.__exit__(None, None, None)
    # Gigabytes of runs and models: not left on the disk for the rest of the test run.
    for folder in [*self.folders.values(), self.models_dir]:
      shutil.rmtree(folder, ignore_errors=True)
      shutil.rmtree(self.home(folder), ignore_errors=True)

  def _lock(self, key: str) -> threading.Lock:
    with self._guard:
      return self._locks.setdefault(key, threading.Lock())

  # --- places -----------------------------------------------------------------
  def folder(self, name: str) -> pathlib.Path:
    with self._lock(f'folder:{name}'):
      if name not in self.folders:
        path = self.tmp.mktemp(f'doc_{name}')
        self.folders[name] = doc_fixtures.checkout(path) if name.startswith('main') else path
      return self.folders[name]

  def home(self, folder: pathlib.Path) -> pathlib.Path:
    """The folder's own $HOME, beside it (TensorFlow writes ~/.keras: not into the cwd)."""
    home = folder.parent / f'{folder.name}_home'
    home.mkdir(exist_ok=True)
    return home

  @property
  def buckets(self) -> doc_fixtures.Buckets:
    with self._lock('emulator'):
      if self._buckets is None:
        from gcs_emulator import GcsEmulator
        self._emulator = GcsEmulator().__enter__()
        self._buckets = doc_fixtures.Buckets(self._emulator)
      return self._buckets

  def web(self) -> doc_fixtures.StaticServer:
    """A static HTTP server on 127.0.0.1 over a folder of its own (started once)."""
    with self._lock('web'):
      if self._web is None:
        self._web = doc_fixtures.StaticServer(self.tmp.mktemp('doc_web')).__enter__()
      return self._web

  def env(self, command: DocCommand, recipe: Recipe, folder: pathlib.Path) -> dict[str, str]:
    env = _base_env()
    env['HOME'] = str(self.home(folder))
    env['PATH'] = os.pathsep.join([str(self.bin), os.path.dirname(sys.executable),
                                   env.get('PATH', '')])
    env['TMPDIR'] = str(self.tmp.mktemp('doc_tmpdir'))
    text = command.text + ' ' + ' '.join(command.exports)
    if doc_commands.gs_buckets(text):
      env.update(self.buckets.emulator.env())
      for bucket in doc_commands.gs_buckets(text):
        self.buckets.ensure(bucket)
    env.update(doc_commands.export_env(command.exports, env))
    env.update(dict(recipe.env))
    if recipe.how == 'launch_dry_run':
      env['DRY_RUN'] = '1'
    return env

  # --- products: the files a command names ----------------------------------------
  def model(self, kind: str) -> pathlib.Path:
    """doc_fixtures.make_models(kind), in its own process (once)."""
    with self._lock(f'model:{kind}'):
      if not (self.models_dir / kind / 'done').exists():
        result = subprocess.run([sys.executable, str(doc_fixtures.TESTS / 'doc_fixtures.py'),
                                 'models', str(self.models_dir), kind], capture_output=True,
                                text=True, timeout=900, env=_base_env())
        assert result.returncode == 0, (f'making the {kind} model files failed:\n'
                                        f'{result.stderr[-3000:]}')
        (self.models_dir / kind / 'done').write_text('')
      return self.models_dir / kind

  def make(self, product: str, folder: pathlib.Path, command: DocCommand) -> None:
    # gs_data is the data of this command's pattern: one upload per pattern.
    key = (str(folder), product + (command.text if product == 'gs_data' else ''))
    with self._lock(f'product:{key}'):
      if key not in self.made:
        self._make(product, folder, command)
        self.made.add(key)

  def _make(self, product: str, folder: pathlib.Path, command: DocCommand) -> None:
    if product == 'workdir':
      self.run_documented(TINY_RUN)
    elif product == 'DIR':   # the README's placeholder for "a clip_jax workdir"
      self.make('workdir', folder, command)
      (folder / 'DIR').symlink_to(folder / 'workdir')
    elif product == 'pairs.csv':
      doc_fixtures.pairs_csv(folder)
    elif product == 'coco_val/':
      doc_fixtures.image_folder(folder / 'coco_val')
    elif product == 'photos/':
      doc_fixtures.photos(folder / 'photos')
    elif product == 'ViT-B-32.pt':   # OpenAI's architecture: open_clip's ViT-B-32 loads it
      (folder / 'ViT-B-32.pt').symlink_to(self.model('full') / 'ViT-B-32.pt')
    elif product == 'small:ViT-B-32.pt':
      (folder / 'ViT-B-32.pt').symlink_to(self.model('small') / 'ViT-B-32.pt')
    elif product in ('open_clip_vit_b32.safetensors', 'clip-vit-base-patch32/'):
      name = product.rstrip('/')
      (folder / name).symlink_to(self.model('small') / name)
    elif product == '~/tensorflow_datasets/cifar10':
      result = subprocess.run([sys.executable, str(doc_fixtures.TESTS / 'doc_fixtures.py'),
                               'cifar10', str(self.home(folder) / 'tensorflow_datasets')],
                              capture_output=True, text=True, timeout=300, env=_base_env())
      assert result.returncode == 0, result.stderr[-3000:]
    elif product == 'shards/{00000..00004}.tar':
      for index in range(5):
        doc_fixtures.img2dataset_tar(folder / 'shards' / f'{index:05d}.tar', first=40 * index)
    elif product == 'laion400m-meta':
      doc_fixtures.url_list(folder / 'laion400m-meta', self.web())
    elif product == 'gs_data':
      self._upload_shards(command)
    else:
      raise AssertionError(f'unknown product {product!r}')

  def _upload_shards(self, command: DocCommand) -> None:
    """The shards a --config.data.train.pattern='gs://...' names: for a {a..b} range the first
    and the last (41,408 uploads would take minutes), for a glob two that match it. The
    trainer's --dry_run reads this host's files in order until one sample decodes."""
    from clip_jax.data.sources import expand_pattern
    for pattern in re.findall(r"pattern='?(gs://[^'\s]+)", command.text):
      bucket = pattern[len('gs://'):].split('/', 1)[0]
      if '*' in pattern:
        files = [pattern.replace('*', f'{i:05d}', 1).replace('*', '') for i in range(2)]
      else:
        files = expand_pattern(pattern)
      for index, name in enumerate(dict.fromkeys([files[0], files[-1]])):
        local = self.tmp.mktemp('doc_shard') / 'shard.tar'
        data = doc_fixtures.img2dataset_tar(local, first=8 * index, count=8)
        self.buckets.upload(bucket, name[len(f'gs://{bucket}/'):], data)

  # --- documented commands --------------------------------------------------------
  def find(self, pattern: str) -> DocCommand:
    matches = [c for c in COMMANDS if re.search(pattern, c.text, re.S)]
    assert matches, f'no documented command matches {pattern!r} (a dependency of another one)'
    return matches[0]

  def run_documented(self, pattern: str) -> Result:
    command = self.find(pattern)
    result = self.run(command)
    assert not result.returncode, (f'depends on {command.id}, which failed:\n' +
                                   result.failure(command.text))
    return result

  def run(self, command: DocCommand) -> Result:
    with self._lock(f'command:{command.id}'):
      if command.id not in self.results:
        try:
          self.results[command.id] = self._run(command)
        except AssertionError as error:   # a product or a dependency failed
          self.results[command.id] = Result(command.text, REPO, 1, '', '', 0.0, error=str(error))
      return self.results[command.id]

  def _run(self, command: DocCommand) -> Result:
    recipe = recipe_for(command)
    folder = self.folder(recipe.folder)
    bad = doc_commands.invalid_buckets(command.text + ' ' + ' '.join(command.exports))
    if bad:
      return Result(command.text, folder, 2, '', '', 0.0, error=(
          f'not a valid GCS bucket name: {", ".join(bad)}. Bucket names are lowercase '
          "(letters, digits, '-', '_', '.'); GCS refuses others, and tensorstore, which "
          'orbax writes checkpoints with, stops the run at the first save with '
          f'"Invalid GCS bucket name: \\"{bad[0]}\\"". Write e.g. gs://my-bucket/... in the docs.'))
    for dependency in recipe.after:
      self.run_documented(dependency)
    for product in recipe.needs:
      self.make(product, folder, command)
    env = self.env(command, recipe, folder)
    if command.kind == 'python':
      argv = [sys.executable, '-c', recipe.prelude + command.text]
      shown = f'python -c <{"prelude + " if recipe.prelude else ""}snippet of {command.id}>'
    else:
      text = command.text
      flags = list(recipe.append)
      if recipe.how == 'dry_run' and not re.search(r'(^| )--dry_run\b', text):
        flags.append('--dry_run')
      if recipe.how == 'launch_dry_run' and text.startswith('launch/gpu/launch.sh '):
        text = text.replace('launch/gpu/launch.sh ', 'launch/gpu/launch.sh --dry-run ', 1)
      if flags:
        text += ' ' + ' '.join(shlex.quote(f) for f in flags)
      if text.rstrip().endswith('&'):
        text += '\nwait'
      argv, shown = ['bash', '-c', text], text
    return _execute(argv, shown, folder, env, recipe.timeout)


def _execute(argv: list[str], shown: str, cwd: pathlib.Path, env: dict[str, str],
             timeout: float) -> Result:
  """Runs argv in its own process group; wall time and CPU time (its whole tree)."""
  out_path, err_path = (cwd.parent / f'.{cwd.name}.{threading.get_ident()}.{n}' for n in ('out', 'err'))
  start = time.time()
  with open(out_path, 'w+') as out, open(err_path, 'w+') as err:
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, text=True,
                               start_new_session=True)
    timed_out = threading.Event()

    def kill():
      timed_out.set()
      try:
        os.killpg(process.pid, 9)
      except ProcessLookupError:
        pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
      _, status, usage = os.wait4(process.pid, 0)
    finally:
      timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  out_path.unlink()
  err_path.unlink()
  result = Result(shown, cwd, 124 if timed_out.is_set() else process.returncode, stdout, stderr,
                  time.time() - start, error=f'timed out after {timeout} s' if timed_out.is_set() else '')
  result.cpu_seconds = usage.ru_utime + usage.ru_stime
  return result



@pytest.fixture(scope='module')
def docs(tmp_path_factory, request):
  shared = Docs(tmp_path_factory, workers=int(os.environ.get('CLIP_JAX_DOCS_WORKERS', '1')))
  selected = [item.callspec.params['command'] for item in request.session.items
              if item.module.__name__ == __name__ and hasattr(item, 'callspec')]
  # The background thread: the models first (the chain after the tiny run needs them),
  # then the independent commands from the end of the docs (the tests start at the top).
  jobs = []
  if any(recipe_for(c) and {'ViT-B-32.pt'} & set(recipe_for(c).needs) for c in selected):
    jobs.append(lambda: shared.model('full'))
  if any(recipe_for(c) and any(n.startswith(('small:', 'open_clip', 'clip-vit')) for n in recipe_for(c).needs)
         for c in selected):
    jobs.append(lambda: shared.model('small'))
  jobs += [functools.partial(shared.run, c) for c in reversed(selected)
           if recipe_for(c) is not None and recipe_for(c).parallel]
  shared.start_background(jobs)
  yield shared
  shared.close()
  reporter = request.config.pluginmanager.get_plugin('terminalreporter')
  capture = request.config.pluginmanager.get_plugin('capturemanager')
  if reporter is not None and capture is not None and shared.results:
    with capture.global_and_fixture_disabled():   # teardown output is captured otherwise
      reporter.write_line('\ndocumented commands (wall s / CPU s of its processes):')
      for command in COMMANDS:
        result = shared.results.get(command.id)
        if result is not None:
          reporter.write_line(f'  {result.seconds:6.1f} {result.cpu_seconds:6.1f}'
                              f'  rc={result.returncode:<3} {command.id}')


def _is_slow(command: DocCommand) -> bool:
  recipe = recipe_for(command)
  return recipe is not None and recipe.how in ('real', 'dry_run') and not re.search(
      r'--help|^bash |^sbatch ', command.text)


CASES = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if _is_slow(c) else [])
         for c in COMMANDS]


# --- the tests ----------------------------------------------------------------------------

def test_the_docs_have_commands():
  files = {c.file for c in COMMANDS}
  assert {'README.md', 'docs/tpu_pod.md', 'docs/gpu_cluster.md'} <= files, files
  assert sum(c.file.startswith('configs/') for c in COMMANDS) >= 10


def test_every_recipe_is_used():
  """A recipe no documented command matches is left over from an edit of the docs."""
  unused = [r.pattern for r in RECIPES if not any(re.search(r.pattern, c.text, re.S)
                                                  for c in COMMANDS)]
  assert not unused, f'recipes for commands the docs no longer have: {unused}'


@pytest.mark.parametrize('command', CASES)
def test_documented_command(command: DocCommand, docs: Docs):
  recipe = recipe_for(command)
  assert recipe is not None, f'documented command has no test recipe: {command.text}'
  if recipe.how == 'ci':
    _check_ci_runs_it(command)
    return
  if recipe.how == 'installed':
    _check_installed(command)
    return
  if recipe.how == 'covered':
    _check_covered(command, recipe.covered_by)
    return
  result = docs.run(command)
  if recipe.documented_exit and result.returncode:
    # A failure the docs state (an upstream bug), with this exact message and nothing else.
    assert re.search(recipe.documented_exit, result.stderr), result.failure(command.text)
  else:
    assert result.returncode == 0, result.failure(command.text)
  for pattern in recipe.expect:
    assert re.search(pattern, result.output, re.M), (
        f'{command.id}: expected /{pattern}/ in the output\n' + result.failure(command.text))
  if recipe.check is not None:
    recipe.check(result, result.cwd, docs)


def _check_ci_runs_it(command: DocCommand) -> None:
  """.ci/run must take the Quickstart's lines from README.md (so that CI runs exactly what
  a user types), not a copy of them: directly, or through the helper it runs
  (.ci/quickstart.py), whose output must then hold this very command."""
  ci = (REPO / '.ci' / 'run').read_text()
  helpers = sorted(set(re.findall(r'\.ci/[\w.-]+\.py', ci)))
  if helpers:
    printed = []
    for helper in helpers:
      done = subprocess.run([sys.executable, str(REPO / helper)], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
      assert done.returncode == 0, f'{helper} failed:\n{done.stderr[-3000:]}'
      printed += done.stdout.splitlines()
    assert command.text in printed, (
        f'{command.id}: .ci/run runs the lines {helpers} print, which do not include '
        f'this Quickstart command:\n  {command.text}\nprinted: {printed}')
    assert re.search(r'bash -c "\$\{quickstart\[\d\]\}', ci), (
        f'.ci/run reads the Quickstart commands with {helpers} but does not run them')
  else:
    assert 'README.md' in ci, (
        f'{command.id}: the Quickstart command is run by CI only if .ci/run reads it from '
        f'README.md; .ci/run does not mention README.md:\n{ci}')
  copied = [w for w in command.text.split(' && ') if w.startswith('pip install')]
  assert all(w not in ci for w in copied), (
      f'{command.id}: .ci/run copies the line ({copied}) instead of reading it from README.md')


def _check_covered(command: DocCommand, covered_by: str) -> None:
  """Run by another test (too slow to run twice): that test must exist and name the
  command's config (e.g. `:local` and `configs/`), so a command is never silently dropped."""
  assert covered_by, f'{command.id}: no test is named as the one that runs it'
  path, _, name = covered_by.partition('::')
  text = (REPO / path).read_text() if (REPO / path).is_file() else ''
  assert f'def {name}(' in text, f'{command.id} is said to be run by {covered_by}, which does not exist'
  config = re.search(r'--config=(\S+)', command.text)
  assert config is None or ':local' in text or config.group(1) in text, (
      f'{covered_by} does not mention {config.group(1)}: it cannot be what runs {command.id}')


def _check_installed(command: DocCommand) -> None:
  """`pip install A B`: nothing is downloaded at test time, so A and B must be part of
  the test environment (setup.py's extras) for the lines after it to be testable."""
  packages = [w for w in shlex.split(command.text)[2:] if not w.startswith('-')]
  missing = []
  for package in packages:
    try:
      importlib.metadata.distribution(re.split(r'[<>=\[]', package)[0])
    except importlib.metadata.PackageNotFoundError:
      missing.append(package)
  assert not missing, (
      f'{command.id}: `{command.text}` installs {missing}, which the test environment lacks; '
      "add them to setup.py's 'test' extra so that CI can run the commands that use them")
