"""The base experiment config every file in `configs/` starts from, and its validation.

Configs are ml_collections ConfigDicts (big_vision style). `get_config(arch)` gives
every key with its default; `configs/<model>.py` changes what differs and documents
how to run it. Sections are built by one small function each so the defaults of a
subsystem sit in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections

from clip_jax import sharding, storage
from clip_jax.data.tokenizers import default_tokenizer_type
from clip_jax.models.architectures import VISION_OPTIONS, canonical_name, model_config
from clip_jax.models.clip import validate_model_config
from clip_jax.models.vit import valid_mask_ratio
from clip_jax.losses import LOSSES
from clip_jax.optim import validate_optim_config


def _mesh_defaults() -> ml_collections.ConfigDict:
  # clip_jax.sharding.MeshLayout: axis sizes over `axes`, default (data, fsdp, model); -1
  # takes the devices that are left. The shape picks the strategy: (n,1,1) data
  # parallel, (d,f,1) FSDP, (d,f,m) + tensor parallel. Axes may be renamed: the roles
  # below name them (checked: each must be one of `axes`).
  return ml_collections.ConfigDict(dict(
      shape=sharding.MESH_SHAPE, axes=sharding.MESH_AXES,
      batch_axes=sharding.BATCH_AXES,   # data-parallel axes: a batch is split over them
      # Ordered (regex over 'visual/.../kernel', spec) overrides; spec 'fsdp,model',
      # ',fsdp' or '' (replicated), 'fsdp+model' splits one dimension over two axes.
      param_rules=(),
      # Ordered (logical axis, mesh axis): tensor parallelism of heads and MLP widths.
      logical_rules=sharding.DEFAULT_LOGICAL_RULES,
      fsdp_axis=sharding.FSDP_AXIS,     # parameters and optimizer state split over it; '' = none
      fsdp_min_size=sharding.FSDP_MIN_SIZE,   # smaller arrays stay replicated under FSDP
  ))


def _loss_defaults() -> ml_collections.ConfigDict:
  # clip_jax.losses: 'softmax' (CLIP, all-gather), 'sigmoid' (SigLIP), 'ring' (softmax,
  # ppermute ring, O(B_local^2) memory), 'ring_sigmoid' (SigLIP on the ring, the same). For SigLIP set model.logit_scale_init=log(10).
  return ml_collections.ConfigDict(dict(name='softmax', sigmoid_bias_init=-10.0))


def _optim_defaults() -> ml_collections.ConfigDict:
  # clip_jax.optim: AdamW as the paper (beta2 0.98, eps 1e-6, decay 0.2), warmup + cosine.
  return ml_collections.ConfigDict(dict(
      learning_rate=5e-4,
      warmup_steps=2000,
      end_lr_factor=0.0,        # final LR = factor x peak
      b1=0.9, b2=0.98, eps=1e-6,
      weight_decay=0.2,
      grad_clip_norm=1.0,       # global norm over trainable leaves; 0 = off
      mu_dtype='float32',       # 'bfloat16' keeps Adam's first moment in half precision
      # Regexes over 'params/<model path>' and 'loss_params/<name>' (clip_jax.optim).
      no_decay=(r'(^|/)(scale|bias)$', r'(^|/)positional_embedding$',
                r'(^|/)class_embedding$', r'(^|/)logit_scale$'),
      lr_multipliers=(),        # ordered (regex, multiplier); first match wins
      freeze=(),                # e.g. (r'^params/visual/',) locks the image tower (LiT)
  ))


def _train_defaults() -> ml_collections.ConfigDict:
  # clip_jax.train_step. micro_batches > 1: GradCache accumulation (exact big-batch grads).
  # stages: (until_step, mask_ratio, image_size, text_length) per stage, in order; the
  # last until_step is total_steps. Steps up to until_step (1-based, inclusive) drop that
  # share of image patches (FLIP; ViT only), see images resized to image_size (CLIPA; the
  # position embedding is interpolated) and texts truncated to text_length tokens (the
  # end-of-text token kept last). () = one stage of the model's own mask_ratio,
  # image_size and context_length. On the command line a tuple of tuples, e.g. for
  # ViT-B/16's 390,625 steps FLIP (95% at mask 0.5, then unmasked tuning) or CLIPA
  # (112 px and 32 tokens, then the full 224 px and 77):
  #   --config.train.stages='((371094,0.5,224,77),(390625,0.0,224,77))'
  #   --config.train.stages='((351563,0.0,112,32),(390625,0.0,224,77))'
  # Evaluation always runs unmasked at the model's image size and context length.
  return ml_collections.ConfigDict(dict(micro_batches=1, stages=()))


def _eval_defaults() -> ml_collections.ConfigDict:
  # Evaluation (clip_jax.evaluate). Dataset specs are comma-separated: the built-in sets
  # (clip_jax.evaluate.datasets.BUILTIN_SETS), 'folder:PATH', 'tfds:NAME' (under
  # data_dir, no download), 'shards:GLOB', 'wds:ROOT' (clip_benchmark's webdataset layout;
  # its classnames and templates win under templates='auto').
  return ml_collections.ConfigDict(dict(
      every_steps=0,            # trainer: evaluate every N steps; 0 = only at the end
      batch_size=256,           # global batch of feature extraction and prompt encoding
      zeroshot='',              # datasets for zero-shot classification
      retrieval='',             # datasets with captions for image<->text Recall@K
      linear_probe='',          # datasets for the logistic-regression probe (train_split -> split)
      split='test',             # the split that is scored
      train_split='train',      # the split the linear probe is fitted on
      templates='auto',         # template set name, 'auto' (by dataset name) or a file
      classnames='',            # file with one class name per line ('' = the dataset's own)
      data_dir='',              # TFDS data_dir
      max_examples=0,           # per split; 0 = all
      cache_dir='',             # zero-shot classifier cache; '' = none (the CLI: <out>/eval_cache)
      probe_val_fraction=0.2,   # share of the train split that chooses C
  ))


def _data_defaults(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # clip_jax.data: the training source, crops, host pipeline and tokenizer (by default the
  # one the text tower was made for: clip_jax.data.tokenizers.default_tokenizer_type).
  return ml_collections.ConfigDict(dict(
      train=dict(
          # 'tfrecord' | 'wds' (img2dataset .tar) | 'tfds'; '' = from the pattern
          # (*.tar -> wds, tfds:NAME -> tfds, else tfrecord).
          source='',
          pattern='',               # globs and {00000..00099} ranges, comma-separated; gs:// ok
          tfds_name='', tfds_split='train', data_dir='',   # source 'tfds' (never downloads)
          # '' = the first feature a record has of 'image,jpg,jpeg,png,webp' (wds: members
          # .jpg/.jpeg/.png/.webp) and of 'caption,txt' (wds: .txt); tfds: a feature path.
          image_key='',
          caption_key='',
          label_key='',             # '' = no labels; e.g. 'label' (wds: 'cls')
          caption_template='',      # captions from class names, e.g. 'a photo of a {}.'
      ),
      crop='square',                # 'square' (the paper) | 'random_resized' (open_clip)
      crop_scale=(0.9, 1.0),        # area fraction of the crop
      crop_ratio=(3 / 4, 4 / 3),    # aspect ratios of 'random_resized'
      resize_method='bicubic',
      shuffle_buffer=10_000,        # samples, within a group of cycle_length files
      cycle_length=16,              # files of a host read at once (interleaved)
      num_parallel_calls=-1,        # decode threads; -1 = tf.data AUTOTUNE
      prefetch=2,                   # host batches prepared ahead by tf.data
      read_attempts=6,              # tries of a failing shard read before the run stops
      read_retry_seconds=1.0,       # wait before the 2nd try; doubles each time (<= 60 s)
      device_prefetch=2,            # global batches prepared ahead by prefetch_to_mesh
      tokenizer=dict(
          type=default_tokenizer_type(model),
          vocab_path='',            # clip_bpe merges file; '' = the one open_clip ships
          model_path='',            # sentencepiece .model (python -m clip_jax.data.train_tokenizer)
          context_length=model.text.context_length,
      ),
  ))


def _checkpoint_defaults() -> ml_collections.ConfigDict:
  # clip_jax.checkpoint.TrainCheckpointer under <workdir>/checkpoints; the trainer resumes
  # from the latest one on start, and saves on SIGTERM (preemption) before exiting.
  return ml_collections.ConfigDict(dict(
      every_steps=1000,         # regular saves (and always at the last step)
      keep=3,                   # the last K regular checkpoints are kept
      keep_every=0,             # and every M-th step for good; 0 = none
      async_save=True,          # write in the background while training goes on
  ))


def _log_defaults() -> ml_collections.ConfigDict:
  # clip_jax.metrics_writer: console, <workdir>/metrics.jsonl, TensorBoard event files.
  return ml_collections.ConfigDict(dict(
      every_steps=50,           # console line + metrics.jsonl + TensorBoard
      tensorboard=True,         # event files under <workdir>/tensorboard
      progress_bar=True,        # a live bar between log lines (only when stdout is a TTY)
      profile_steps=(),         # (first, last): jax.profiler trace of those steps -> <workdir>/profile
  ))


def _builtin_defaults() -> ml_collections.ConfigDict:
  # clip_jax.data.builtin: drawn scenes written once as TFRecord shards + a SentencePiece
  # tokenizer; `enabled` makes them the training data (config.data.train is then set).
  return ml_collections.ConfigDict(dict(
      enabled=False,
      num_train=8000,           # training images (each with captions_per_image captions)
      captions_per_image=3,
      num_shards=8,
      seed=0,
      dir='',                   # '' = <workdir>/builtin_data
  ))


def get_config(arch: str = 'tiny', **model_overrides: Any) -> ml_collections.ConfigDict:
  """The full default config for architecture `arch` (see clip_jax.models.architectures)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(canonical_name(arch), **model_overrides)
  config.batch_size = 256            # global batch over all hosts and devices
  config.total_steps = 1000
  config.mesh = _mesh_defaults()
  config.loss = _loss_defaults()
  config.optim = _optim_defaults()
  config.train = _train_defaults()
  config.eval = _eval_defaults()
  config.data = _data_defaults(config.model)
  config.checkpoint = _checkpoint_defaults()
  config.log = _log_defaults()
  config.builtin = _builtin_defaults()
  return config


def _unknown_keys(config: Any, reference: Any, prefix: str) -> list[str]:
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    return []
  if not isinstance(reference, (ml_collections.ConfigDict, dict)):
    return []
  unknown = []
  for key in config.keys():
    if key not in reference:
      unknown.append(f'{prefix}{key}')
    else:
      unknown += _unknown_keys(config[key], reference[key], f'{prefix}{key}.')
  return unknown


# Sections whose keys depend on the chosen variant (they are not checked for unknown keys).
_FREE_FORM = ('model.vision', 'model.text')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first unknown or invalid key."""
  if 'model' not in config or 'name' not in config.model:
    raise ValueError('config.model.name: missing; expected an architecture name such as "ViT-B/32"')
  reference = get_config(config.model.name)
  unknown = [k for k in _unknown_keys(config, reference, '')
             if not any(k.startswith(f + '.') for f in _FREE_FORM)]
  if unknown:
    raise ValueError(f'config: unknown key(s) {", ".join("config." + k for k in unknown)}; '
                     'check the spelling against clip_jax/config.py')
  validate_model_config(config.model)
  sharding.rules_from_config(config.mesh)     # every key of config.mesh
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size: expected a positive integer, got {config.batch_size}')
  _validate_training(config)
  _validate_eval(config.eval)


def _validate_eval(section: ml_collections.ConfigDict) -> None:
  """config.eval: sizes, fractions and the template choice (datasets are checked when read)."""
  from clip_jax.evaluate.templates import TEMPLATE_SETS  # pylint: disable=import-outside-toplevel
  for key in ('batch_size', 'every_steps', 'max_examples'):
    value, least = section[key], 1 if key == 'batch_size' else 0
    if not isinstance(value, int) or value < least:
      raise ValueError(f'config.eval.{key}: expected an integer >= {least}, got {value!r}')
  if not 0 < section.probe_val_fraction < 1:
    raise ValueError(f'config.eval.probe_val_fraction: expected a fraction in (0, 1), got '
                     f'{section.probe_val_fraction!r}')
  templates = section.templates
  if templates != 'auto' and templates not in TEMPLATE_SETS and not storage.is_file(templates):
    raise ValueError(f'config.eval.templates: {templates!r} is neither auto, a template set '
                     f'({", ".join(TEMPLATE_SETS)}) nor an existing file')


def _validate_training(config: ml_collections.ConfigDict) -> None:
  """config.loss / optim / train (the train step's sections)."""
  if config.loss.name not in LOSSES:
    raise ValueError(f'config.loss.name: unknown loss {config.loss.name!r}; expected one of '
                     f'{LOSSES}')
  micro = config.train.micro_batches
  if not isinstance(micro, int) or micro < 1 or config.batch_size % micro:
    raise ValueError(f'config.train.micro_batches: expected a positive integer dividing '
                     f'config.batch_size {config.batch_size}, got {micro}')
  validate_optim_config(config.optim)
  training_stages(config)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One entry of config.train.stages: the settings of steps up to `until_step`."""
  until_step: int
  mask_ratio: float
  image_size: int
  text_length: int

  @property
  def settings(self) -> tuple[float, int, int]:
    """What the compiled step and the input pipeline depend on (not the step range)."""
    return (self.mask_ratio, self.image_size, self.text_length)

  def describe(self) -> str:
    return f'mask {self.mask_ratio}, {self.image_size} px, {self.text_length} tokens'


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _stage(config: ml_collections.ConfigDict, index: int, entry: Any) -> Stage:
  """config.train.stages[index] as a Stage, checked on its own and against the model."""
  key = f'config.train.stages[{index}]'
  if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 4:
    raise ValueError(f'{key}: expected (until_step, mask_ratio, image_size, text_length), '
                     f'got {entry!r}')
  until, mask, size, length = entry
  context = config.model.text.context_length
  if not _is_int(until) or until <= 0:
    raise ValueError(f'{key}: until_step expected a positive integer, got {until!r}')
  if not valid_mask_ratio(mask):
    raise ValueError(f'{key}: mask_ratio expected a number in [0, 1), got {mask!r}')
  if not _is_int(size) or size <= 0:
    raise ValueError(f'{key}: image_size expected a positive integer, got {size!r}')
  if not _is_int(length) or not 2 <= length <= context:
    raise ValueError(f'{key}: text_length expected an integer in [2, config.model.text.'
                     f'context_length={context}] (start and end tokens at least), got '
                     f'{length!r}')
  # The model's own rules (the patch size / 32 divides the image size; masking needs a
  # ViT) decide whether it runs at these settings.
  model = config.model.to_dict()
  model['vision'] = dict(model['vision'], image_size=size, mask_ratio=float(mask))
  try:
    validate_model_config(model)
  except ValueError as error:
    raise ValueError(f'{key}: the model cannot run mask_ratio {mask}, image_size {size}: '
                     f'{error}') from error
  return Stage(until, float(mask), size, length)


def training_stages(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
  """config.train.stages as Stages, validated; () gives one stage of the model's own
  mask_ratio, image_size and context_length until config.total_steps."""
  entries = tuple(config.train.stages)
  if not entries:
    vision = config.model.vision
    mask = vision.get('mask_ratio', VISION_OPTIONS['mask_ratio'])   # older configs lack it
    return (Stage(config.total_steps, float(mask), vision.image_size,
                  config.model.text.context_length),)
  stages = tuple(_stage(config, i, entry) for i, entry in enumerate(entries))
  for i in range(1, len(stages)):
    if stages[i].until_step <= stages[i - 1].until_step:
      raise ValueError(f'config.train.stages[{i}]: until_step {stages[i].until_step} is not '
                       f'after the previous stage\'s {stages[i - 1].until_step}; expected '
                       'strictly increasing until_step')
  if stages[-1].until_step != config.total_steps:
    raise ValueError(f'config.train.stages[{len(stages) - 1}]: until_step '
                     f'{stages[-1].until_step}; the last stage must end at '
                     f'config.total_steps={config.total_steps}')
  return stages


def stage_index(stages: Sequence[Stage], step: int) -> int:
  """The index of the stage that runs step `step` (1-based: the step-th update)."""
  for index, stage in enumerate(stages):
    if step <= stage.until_step:
      return index
  return len(stages) - 1
